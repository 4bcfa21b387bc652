"""The offline teacher cache: the teacher's step-2 signal computed once, stored per sample, reused.

``jobs/teacher_cache.py`` (:func:`vlsi_ray.teacher.cache.build_cache`) writes, for every train row
step 2 can draw, that row's :class:`TeacherSignal` (every teacher target layer and the final layer,
top-k + tail, tail samples if configured) to Parquet shards under the cache directory, and last a
``manifest.json``. Step 2 with ``teacher.source=cache`` reads it through :class:`TeacherCache`, a
callable ``batch -> TeacherSignal`` that stands where the live teacher stands, instead of
teacher actors.

One Parquet row per sample: ``id`` (string), ``tokens`` (int32: its response tokens ``n``), and the
codec's arrays (:meth:`TeacherSignal.to_numpy`) as raw bytes in C order: ``topk_logprobs``
(storage dtype ``[L, n, k]``), ``topk_ids`` (int32 ``[L, n, k]``), ``tail_logmass`` (float32
``[L, n]``) and, with tail samples, ``tail_sample_logprobs`` / ``tail_sample_ids`` ``[L, n, m]``.

The manifest's ``spec`` (:func:`cache_spec`) names everything the signal depends on: teacher and
verbalizer weights, the student's tokenizer and image processor (they collate the batches), k, tail
samples and their seed, storage dtype, KD temperature, shared vocabulary, ``data.max_length``, the
train shards and the tasks. A run refuses a cache whose spec differs from its own
(:class:`CacheMismatchError`, naming the field).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlsi_ray.data.fingerprint import PROCESSOR_FILES, fingerprint
from vlsi_ray.method.steps import response_token_counts
from vlsi_ray.signals.teacher_signal import STORAGE_DTYPES, TeacherSignal

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_SIGNAL_ARRAYS = ("topk_logprobs", "topk_ids", "tail_logmass", "tail_sample_logprobs", "tail_sample_ids")
_ID_DTYPE, _TAIL_DTYPE = np.int32, np.float32


class CacheMismatchError(ValueError):
    """A teacher cache that does not belong to this run (one sentence naming the differing field)."""


# ----------------------------------------------------------------------------------------- spec
def cache_spec(
    cfg,
    teacher_dir: str | Path,
    verbalizer_dir: str | Path,
    student_dir: str | Path,
    vocab_size: int,
    train_files: Sequence[str | Path],
    tail_seed: int,
) -> dict:
    """What a cached signal depends on, for ``cfg``'s step 2 (compared field by field on use).

    ``teacher_dir`` / ``verbalizer_dir``: the teacher and its step-1 verb-FFNs; ``student_dir``: the
    student base (its tokenizer and image processor collate the batches); ``train_files``: the train
    shards; ``vocab_size``: the shared vocabulary the KL runs over; ``tail_seed``: step 2's seed,
    which seeds the tail samples (recorded only when there are any).
    """
    signal = cfg.signal
    return {
        "format": FORMAT_VERSION,
        "teacher": fingerprint([teacher_dir], ("*.json", "*.safetensors", "*.bin")),
        "teacher_verbalizers": fingerprint([verbalizer_dir]),
        "collator": fingerprint([student_dir], PROCESSOR_FILES),
        "teacher.dtype": cfg.teacher.dtype,  # the signal is computed in it
        "images": [cfg.images.min_pixels, cfg.images.max_pixels],  # with the collator, what the image tokens are
        "signal.topk": signal.topk,
        "signal.tail_samples": signal.tail_samples,
        "tail_seed": tail_seed if signal.tail_samples else None,
        "signal.storage": signal.storage,
        "loss.kd_temperature": cfg.loss.kd_temperature,
        "vocab_size": int(vocab_size),
        "data.max_length": cfg.data.max_length,
        "data": fingerprint(train_files, whole=2**20, edge=2**16),  # terabytes of shards: their ends (footers) only
        "stages.interact.tasks": sorted(cfg.stages.interact.tasks),
    }


#: How to fix each spec field that differs (the rest of the sentence after "rebuild the cache or").
_FIXES = {
    "teacher": "point teacher.path at the teacher the cache was built with",
    "teacher_verbalizers": "reuse the step-1 verbalizers the cache was built with",
    "collator": "use the student the cache was built with",
    "data": "use the train shards the cache was built with",
    "tail_seed": "use the seed the cache was built with",
}


def check_spec(manifest: dict, expected: dict, where: str | Path) -> None:
    """Raise :class:`CacheMismatchError` naming the first field where ``manifest``'s spec and ``expected`` differ."""
    spec = manifest.get("spec", {})
    for key, want in expected.items():
        have = spec.get(key)
        if have != want:
            fix = _FIXES.get(key, f"set {key}={have}")
            raise CacheMismatchError(
                f"the teacher cache in {where} was built with {key}={have} but this run needs {want}; rebuild it "
                f"with `python jobs/teacher_cache.py` and this run's config, or {fix}."
            )


def load_manifest(cache_dir: str | Path) -> dict:
    """The cache's manifest; a missing one raises ``FileNotFoundError`` saying how to build it."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher.source=cache but {path} does not exist; build the cache with `python jobs/teacher_cache.py` "
            "(same config and overrides as the run), or set teacher.source=live."
        )
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------- rows
def signal_rows(encoded: dict[str, np.ndarray], ids: Sequence[str], counts: Sequence[int]) -> pa.Table:
    """One batch's encoded signal (:meth:`TeacherSignal.to_numpy`, tokens in row order) -> one Parquet row per sample.

    ``counts[i]`` is row ``i``'s number of response tokens; they must add up to the signal's ``N``.
    """
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    arrays = {k: v for k, v in encoded.items() if k in _SIGNAL_ARRAYS}
    n = next(iter(arrays.values())).shape[1]
    if offsets[-1] != n:
        raise ValueError(f"the signal has {n} tokens but the rows' response tokens add up to {offsets[-1]}.")
    columns = {"id": pa.array([str(i) for i in ids], pa.string()), "tokens": pa.array(counts, pa.int32())}
    for name, array in arrays.items():
        columns[name] = pa.array(
            [np.ascontiguousarray(array[:, a:b]).tobytes() for a, b in zip(offsets[:-1], offsets[1:])], pa.binary()
        )
    return pa.table(columns)


def _decode_row(row: dict, layers: int, k: int, samples: int, storage: str) -> dict[str, np.ndarray]:
    n = int(row["tokens"])
    shapes = {
        "topk_logprobs": (STORAGE_DTYPES[storage], (layers, n, k)),
        "topk_ids": (_ID_DTYPE, (layers, n, k)),
        "tail_logmass": (_TAIL_DTYPE, (layers, n)),
    }
    if samples:
        shapes.update(
            tail_sample_logprobs=(STORAGE_DTYPES[storage], (layers, n, samples)),
            tail_sample_ids=(_ID_DTYPE, (layers, n, samples)),
        )
    return {name: np.frombuffer(row[name], dtype=dtype).reshape(shape) for name, (dtype, shape) in shapes.items()}


class TeacherCache:
    """Callable ``batch -> TeacherSignal`` over a teacher cache: step 2's teacher when ``teacher.source=cache``.

    ``expected`` (a :func:`cache_spec`) is checked against the manifest on construction. Looks rows
    up by the batch's ``ids`` and concatenates their tokens in batch order, exactly as the live
    teacher lays out a batch's response tokens. Reads whole Parquet row groups and keeps the last
    ``row_groups_in_memory`` of them. Has the teacher client's interface for the Ray Train loop
    (``start_at``, ``pipelined``, ``counters``) and pickles without its buffers.
    """

    def __init__(self, cache_dir: str | Path, expected: dict | None = None, row_groups_in_memory: int = 64):
        self.dir = Path(cache_dir)
        self.manifest = load_manifest(self.dir)
        if expected is not None:
            check_spec(self.manifest, expected, self.dir)
        self.row_groups_in_memory = row_groups_in_memory
        self.read_seconds = 0.0
        self.bytes_read = 0
        self.requests = 0
        self._index: dict[str, tuple[int, int, int]] | None = None
        self._groups: OrderedDict[tuple[int, int], list[dict]] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_index"], state["_groups"] = None, OrderedDict()
        return state

    @property
    def files(self) -> list[Path]:
        return [self.dir / name for name in self.manifest["files"]]

    def _build_index(self) -> dict[str, tuple[int, int, int]]:
        """``id -> (file, row group, row in group)`` from the ``id`` column of every row group."""
        index = {}
        for f, path in enumerate(self.files):
            reader = pq.ParquetFile(path)
            for g in range(reader.num_row_groups):
                for r, row_id in enumerate(reader.read_row_group(g, columns=["id"]).column("id").to_pylist()):
                    index[row_id] = (f, g, r)
        return index

    def _group(self, f: int, g: int) -> list[dict]:
        key = (f, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        rows = pq.ParquetFile(self.files[f]).read_row_group(g).to_pylist()
        self._groups[key] = rows
        while len(self._groups) > self.row_groups_in_memory:
            self._groups.popitem(last=False)
        return rows

    def rows(self, ids: Sequence) -> list[dict[str, np.ndarray]]:
        """The encoded arrays of each id's signal (``[L, n_i, ...]``), in order; an unknown id raises ``KeyError``."""
        if self._index is None:
            self._index = self._build_index()
        spec = self.manifest["spec"]
        layers, k = self.manifest["layers"], self.manifest["k"]
        out = []
        for row_id in ids:
            where = self._index.get(str(row_id))
            if where is None:
                raise KeyError(
                    f"row {row_id!r} is not in the teacher cache {self.dir}; rebuild it with `python jobs/teacher_cache.py`."
                )
            f, g, r = where
            out.append(_decode_row(self._group(f, g)[r], layers, k, spec["signal.tail_samples"], spec["signal.storage"]))
        return out

    def __call__(self, batch: dict) -> TeacherSignal:
        """The cached signal of ``batch`` (its rows' tokens concatenated in batch order), on the batch's device."""
        started = time.perf_counter()
        rows = self.rows(batch["ids"])
        counts = response_token_counts(batch["labels"])
        if counts != [row["tail_logmass"].shape[1] for row in rows]:
            raise ValueError(
                f"the teacher cache {self.dir} holds other response-token counts than this batch "
                f"({[row['tail_logmass'].shape[1] for row in rows]} vs {counts}); it was built with other data or collation."
            )
        encoded = {name: np.concatenate([row[name] for row in rows], axis=1) for name in rows[0]}
        encoded["vocab_size"] = np.array(self.manifest["spec"]["vocab_size"], dtype=np.int64)
        encoded["temperature"] = np.array(self.manifest["spec"]["loss.kd_temperature"], dtype=np.float64)
        signal = TeacherSignal.from_numpy(encoded)
        self.bytes_read += sum(a.nbytes for a in encoded.values())
        self.requests += 1
        self.read_seconds += time.perf_counter() - started
        device = batch["input_ids"].device if "input_ids" in batch else "cpu"
        return signal.to(device)

    # The teacher client's interface, so the Ray Train loop takes either.
    def start_at(self, replica: int) -> None:
        """Nothing to spread: every worker reads the same files."""

    def pipelined(self, batches: Iterable[dict]) -> Iterator[dict]:
        """The batches unchanged (a cached row is read when the batch is used)."""
        return iter(batches)

    def counters(self) -> dict:
        """Seconds spent reading, bytes decoded and batches served (the client's keys, for the same logs)."""
        return {
            "teacher_wait_s": self.read_seconds,
            "teacher_forward_s": 0.0,
            "signal_bytes": self.bytes_read,
            "teacher_requests": self.requests,
            "teacher_resubmissions": 0,
        }
