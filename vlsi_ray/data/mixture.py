"""A data mixture (the paper's table of sources) converted into the project's Parquet shards with Ray Data.

A mixture file lists sources and the held-out rows to draw from each::

    sources:
      - {name: sharegpt4v, format: llava, path: /data/sharegpt4v.json, image_root: /data/images}
      - {name: mathinstruct, format: sharegpt, path: /data/mathinstruct.jsonl, limit: 100000}
      - {name: docvqa, format: hf_parquet, path: /data/docvqa/}
      - {name: shapes, format: synthetic, train: 6000, val: 500, test: 1000, seed: 0}
    holdout: {val: 500, test: 1000}   # drawn per source, seeded (the synthetic task keeps its own splits)
    seed: 0

:func:`prepare` makes two passes over the input files as Ray Data pipelines. The first counts each
file's records (in parallel, no images read); the driver then knows every record's number in its
source, applies each ``limit`` (the first records in file order) and draws each source's held-out
records (seeded). The second reads the files again in chunks of ``rows_per_shard`` records and
converts each chunk in a pool of workers: images read, checked and kept or re-encoded there, each
row's token count measured with the student's processor (image tokens included), bad rows left out
with their reason. Each chunk is written as its own Parquet file, named by its place in the input,
so the output does not depend on which worker ran first. ``train`` keeps one shard per chunk; the
small ``val``/``test`` splits are packed into shards of ``rows_per_shard`` rows.

A record that cannot be converted, fails :func:`validate_row`, or is longer than ``max_length`` is
skipped and counted (``on_error="skip"``) or stops the job naming it (``"raise"``). ``manifest.json``
records per source the records read and taken, the rows kept per split, every skipped row's id and
reason, a content fingerprint of its files, and the command.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml
from ray.data import DataContext

from vlsi_ray.data.collate import IGNORE_INDEX, ChatCollator
from vlsi_ray.data.fingerprint import fingerprint
from vlsi_ray.data.formats import FORMATS, BadRecord, Source, get_format
from vlsi_ray.data.shards import MANIFEST, SCHEMA, SKIP_HINT, SPLITS, validate_row

HELD_OUT = ("val", "test")
#: The manifest's ``kind`` for prepared data (the synthetic generator's manifest has a ``generator_version``).
KIND = "prepared"
FORMAT_VERSION = 1
SOURCE_KEYS = {"name", "format", "path", "image_root", "limit", "task", "holdout"}
ON_ERROR = ("skip", "raise")
_TMP = ".prepare"  # per-chunk files while converting, under the output directory
_PROGRESS_SECONDS = 10.0


class MixtureError(ValueError):
    """A mixture file, one of its sources or one of its records is unusable (one sentence naming it and the fix)."""


@dataclass
class Mixture:
    """The parsed mixture file: its ``sources``, the default per-source ``holdout`` sizes, the ``seed`` of
    the holdout draw, and ``rows_per_shard`` (records per conversion chunk and rows per held-out shard)."""

    sources: list[Source]
    holdout: dict[str, int] = field(default_factory=lambda: {"val": 0, "test": 0})
    seed: int = 0
    rows_per_shard: int = 512

    def holdout_of(self, source: Source) -> dict[str, int]:
        """The ``val``/``test`` sizes drawn from ``source`` (its own ``holdout``, else the mixture's; none
        for a format with its own splits)."""
        if get_format(source.format).splits:
            return {split: 0 for split in HELD_OUT}
        sizes = source.holdout if source.holdout is not None else self.holdout
        return {split: int(sizes.get(split, 0) or 0) for split in HELD_OUT}


def _holdout(value, where: str) -> dict[str, int]:
    if value is None:
        return {split: 0 for split in HELD_OUT}
    if not isinstance(value, dict) or set(value) - set(HELD_OUT):
        raise MixtureError(f"{where} 'holdout' is {value!r}; write it as {{val: N, test: N}}.")
    sizes = {split: value.get(split, 0) or 0 for split in HELD_OUT}
    if not all(isinstance(n, int) and n >= 0 for n in sizes.values()):
        raise MixtureError(f"{where} 'holdout' is {value!r}; the sizes must be whole numbers >= 0.")
    return sizes


def load_mixture(path: str | Path) -> Mixture:
    """Read and check a mixture YAML: known formats, unique names, existing paths (one-sentence errors)."""
    path = Path(path)
    if not path.is_file():
        raise MixtureError(f"mixture file {path} does not exist; pass a YAML file listing the sources.")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise MixtureError(f"mixture file {path} is not valid YAML ({str(err).splitlines()[0]}); fix its syntax.") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("sources"), list) or not spec["sources"]:
        raise MixtureError(f"{path} has no 'sources' list; list each source as {{name, format, path}}.")
    sources = [_source(entry, i, path) for i, entry in enumerate(spec["sources"])]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        repeated = ", ".join(sorted({n for n in names if names.count(n) > 1}))
        raise MixtureError(f"source names in {path} repeat ({repeated}); give each source its own name.")
    rows_per_shard = spec.get("rows_per_shard", 512)
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise MixtureError(f"{path}: rows_per_shard={rows_per_shard!r} must be a whole number >= 1.")
    return Mixture(sources, _holdout(spec.get("holdout"), f"{path}:"), int(spec.get("seed", 0) or 0), rows_per_shard)


def _source(entry, i: int, path: Path) -> Source:
    if not isinstance(entry, dict) or not entry.get("name") or not entry.get("format"):
        raise MixtureError(
            f"source {i} of {path} needs a 'name' and a 'format'; write it as {{name: ..., format: ..., path: ...}}."
        )
    name = str(entry["name"])
    if entry["format"] not in FORMATS:
        raise MixtureError(f"source {name!r} has format {entry['format']!r}; use one of {', '.join(FORMATS)}.")
    limit = entry.get("limit", 0) or 0
    if not isinstance(limit, int) or limit < 0:
        raise MixtureError(f"source {name!r} has limit {limit!r}; use a whole number of records (0: all).")
    holdout = _holdout(entry["holdout"], f"source {name!r}:") if "holdout" in entry else None
    source = Source(
        name=name, format=entry["format"], path=str(entry.get("path") or ""), image_root=entry.get("image_root"), limit=limit,
        task=entry.get("task"), holdout=holdout, options={k: v for k, v in entry.items() if k not in SOURCE_KEYS},
    )  # fmt: skip
    if source.format == "synthetic":
        return source
    if not source.path or not Path(source.path).exists():
        raise MixtureError(f"source {name!r}: path {source.path or '(none)'} does not exist; fix the path in {path}.")
    if not get_format(source.format).files(source):
        raise MixtureError(f"source {name!r}: {source.path} holds no {source.format} files; point its path at them.")
    if source.image_root and not Path(source.image_root).is_dir():
        raise MixtureError(f"source {name!r}: image_root {source.image_root} is not a directory; fix it in {path}.")
    return source


def input_files(mixture: Mixture) -> list[dict]:
    """The units of work: one per input file, ``{"unit", "source", "file", "file_index"}``, sources in order."""
    units = []
    for s, source in enumerate(mixture.sources):
        for i, path in enumerate(get_format(source.format).files(source)):
            units.append({"unit": len(units), "source": s, "file": str(path), "file_index": i})
    return units


# ----------------------------------------------------------------------------------------- pass 1
def count_unit(unit: dict, sources: list[Source]) -> dict:
    """``map``: one input file -> ``{"unit", "records", "error"}`` (``error``: why the file cannot be read, or "")."""
    source = sources[unit["source"]]
    try:
        return {"unit": unit["unit"], "records": get_format(source.format).count_records(source, Path(unit["file"])), "error": ""}
    except (OSError, ValueError, pa.ArrowException) as err:  # not JSON, not a table, unreadable
        return {"unit": unit["unit"], "records": 0, "error": f"{type(err).__name__}: {err}"}


@dataclass
class Plan:
    """Where every record goes, from the record counts alone.

    A record is numbered by its place in its source (files in name order). ``offsets``: per unit, the
    number of its first record; ``taken``: per source, the records under its ``limit``; ``held_out``:
    per source, ``{number: "val" | "test"}`` (the rest of the taken records train).
    """

    offsets: dict[int, int] = field(default_factory=dict)
    records: dict[int, int] = field(default_factory=dict)
    taken: dict[int, int] = field(default_factory=dict)
    held_out: dict[int, dict[int, str]] = field(default_factory=dict)

    def split_of(self, source: int, number: int, own_split: str | None = None) -> str | None:
        """The split of record ``number`` of ``source`` (``own_split`` for a format with its own splits),
        or None when the source's ``limit`` leaves it out."""
        if number >= self.taken.get(source, 0):
            return None
        if own_split is not None:
            return own_split
        return self.held_out.get(source, {}).get(number, "train")


def make_plan(mixture: Mixture, units: list[dict], counts: dict[int, int]) -> Plan:
    """Number the records from ``counts`` (per unit), apply each source's limit, draw its held-out records.

    The draw is ``numpy``'s seeded choice without replacement over the taken records, seeded by the
    mixture's ``seed`` and the source's name: the same mixture gives the same splits.
    """
    result = Plan()
    for s, source in enumerate(mixture.sources):
        total = 0
        for unit in (u for u in units if u["source"] == s):
            result.offsets[unit["unit"]] = total
            total += counts[unit["unit"]]
        result.records[s] = total
        taken = min(total, source.limit) if source.limit else total
        result.taken[s] = taken
        sizes = mixture.holdout_of(source)
        wanted = sum(sizes.values())
        if wanted == 0:
            continue
        if taken <= wanted:
            raise MixtureError(
                f"source {source.name!r} has {taken} records, too few to hold out {sizes['val']} val + {sizes['test']} test rows "
                f"and train on the rest; give it a smaller holdout (holdout: {{val: N, test: N}} on the source)."
            )
        rng = np.random.default_rng([mixture.seed, zlib.crc32(source.name.encode())])
        chosen = rng.choice(taken, size=wanted, replace=False).tolist()
        result.held_out[s] = {n: "val" for n in chosen[: sizes["val"]]} | {n: "test" for n in chosen[sizes["val"] :]}
    return result


def chunk_counts(units: list[dict], the_plan: Plan, counts: dict[int, int], rows: int) -> int:
    """How many chunks pass 2 makes (for its progress line)."""
    total = 0
    for unit in units:
        offset = the_plan.offsets[unit["unit"]]
        kept = max(0, min(counts[unit["unit"]], the_plan.taken[unit["source"]] - offset))
        total += math.ceil(kept / rows)
    return total


# ----------------------------------------------------------------------------------------- pass 2
def read_chunks(unit: dict, sources: list[Source], the_plan: Plan, rows: int) -> Iterator[dict]:
    """``flat_map``: one input file -> chunks ``{"unit", "chunk", "source", "records"}`` of up to ``rows``
    records, ``records`` the pickled list of ``(number, split, record)`` of the records the plan takes."""
    source = sources[unit["source"]]
    fmt = get_format(source.format)
    offset, chunk, current = the_plan.offsets[unit["unit"]], 0, []
    for position, record in enumerate(fmt.records(source, Path(unit["file"]))):
        own = record.get("split") if fmt.splits and isinstance(record, dict) else None
        split = the_plan.split_of(unit["source"], offset + position, own)
        if split is None:  # past the source's limit, and so is the rest of the file
            break
        current.append((offset + position, split, record))
        if len(current) == rows:
            yield {"unit": unit["unit"], "chunk": chunk, "source": unit["source"], "records": pickle.dumps(current)}
            chunk, current = chunk + 1, []
    if current:
        yield {"unit": unit["unit"], "chunk": chunk, "source": unit["source"], "records": pickle.dumps(current)}


class ConvertChunk:
    """``map`` (a pool of workers): one chunk of records -> its rows, written as one Parquet file per split
    under ``tmp``; returns ``{"unit", "chunk", "source", "kept" (JSON: rows per split), "skipped" (JSON:
    [{"id", "record_id" (the record's own id, when it has one), "split", "reason"}])}``.

    ``collator``: the student's :class:`ChatCollator` (no ``max_length``) that measures each row's tokens,
    or None (rows keep ``tokens`` null and no length is checked).
    """

    def __init__(self, sources: list[Source], tmp: str, collator: ChatCollator | None, max_length: int | None):
        self.sources, self.tmp, self.collator, self.max_length = sources, Path(tmp), collator, max_length

    def __call__(self, item: dict) -> dict:
        source = self.sources[item["source"]]
        rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
        skipped = []
        for number, split, record in pickle.loads(item["records"]):
            row, problem = self.row(source, number, record)
            if problem is not None:
                own = record.get("id", record.get("question_id")) if isinstance(record, dict) else None
                named = {"record_id": str(own)} if own is not None else {}
                skipped.append({"id": f"{source.name}/{number}", **named, "split": split, "reason": problem})
                continue
            rows[split].append({**row, "split": split})
        for split, kept in rows.items():
            if kept:
                path = self.tmp / split / f"{item['unit']:06d}-{item['chunk']:07d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in kept], schema=SCHEMA)
                pq.write_table(table, path.with_suffix(".tmp"))
                os.replace(path.with_suffix(".tmp"), path)
        kept = {split: len(r) for split, r in rows.items()}
        return {"unit": item["unit"], "chunk": item["chunk"], "source": item["source"],
                "kept": json.dumps(kept), "skipped": json.dumps(skipped)}  # fmt: skip

    def row(self, source: Source, number: int, record) -> tuple[dict | None, str | None]:
        """One record -> ``(row, None)`` or ``(None, reason)``."""
        if not isinstance(record, dict):
            return None, f"the record is a {type(record).__name__}, not an object"
        try:
            row = get_format(source.format).convert(source, record, number)
        except BadRecord as err:
            return None, str(err)
        except Exception as err:  # a record of an unexpected shape must not stop a million-row conversion
            return None, f"unexpected record shape ({type(err).__name__}: {err})"
        problem = validate_row(row)
        if problem is not None or self.collator is None:
            return row, problem
        try:
            ids, labels, _ = self.collator.encode(row)
        except ValueError as err:  # RowError, or the processor refusing an image
            return None, str(err).split(": ", 1)[-1]
        if all(label == IGNORE_INDEX for label in labels):
            return None, "no response tokens after the chat template"
        if self.max_length is not None and len(ids) > self.max_length:
            return None, f"over-long: {len(ids)} tokens > data.max_length={self.max_length}"
        return {**row, "tokens": len(ids)}, None


# ----------------------------------------------------------------------------------------- driver
def prepare(
    mixture: Mixture,
    out: str | Path,
    *,
    collator: ChatCollator | None = None,
    max_length: int | None = None,
    on_error: str = "skip",
    command: str = "",
    student: str | None = None,
    measured_with: str | None = None,
    concurrency: int | None = None,
) -> dict:
    """Convert ``mixture`` into shards under ``out`` (its old shards and manifest replaced); return the manifest.

    ``collator``: the student's collator that measures each row's tokens (None: not measured, no
    length check); ``max_length``: rows longer than this are bad rows; ``on_error``: ``skip`` (count
    them) or ``raise`` (stop at the first, naming it); ``student``: the checkpoint path recorded in the
    manifest; ``measured_with``: the collator's :func:`~vlsi_ray.data.fingerprint.processor_fingerprint`
    (a run with the same student processor and resolution then trusts the counts and measures nothing);
    ``concurrency``: conversion workers (default: the cluster's CPUs). Needs a running Ray.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; use one of {', '.join(ON_ERROR)}.")
    started = time.perf_counter()
    out = Path(out).resolve()
    _clear(out)
    DataContext.get_current().enable_progress_bars = False  # progress is the lines below
    units = input_files(mixture)
    print(f"[prepare] {len(mixture.sources)} source(s), {len(units)} input file(s) -> {out}", flush=True)
    counted = list(ray.data.from_items(units).map(functools.partial(count_unit, sources=mixture.sources)).iter_rows())
    for row in counted:
        if row["error"]:
            unit = units[row["unit"]]
            name = mixture.sources[unit["source"]].name
            raise MixtureError(f"source {name!r}: {unit['file']} cannot be read ({row['error']}); fix or remove the file.")
    counts = {row["unit"]: row["records"] for row in counted}
    the_plan = make_plan(mixture, units, counts)
    for s, source in enumerate(mixture.sources):
        held = mixture.holdout_of(source)
        print(f"[prepare] {source.name} ({source.format}): {the_plan.records[s]:,} records, {the_plan.taken[s]:,} taken, "
              f"{held['val']} val + {held['test']} test held out", flush=True)  # fmt: skip
    workers = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunks = ray.data.from_items(units).flat_map(
        functools.partial(read_chunks, sources=mixture.sources, the_plan=the_plan, rows=mixture.rows_per_shard)
    )
    results = chunks.map(
        ConvertChunk,
        fn_constructor_args=(mixture.sources, str(out / _TMP), collator, max_length),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
    )
    kept, skipped = _gather(results, mixture, on_error, chunk_counts(units, the_plan, counts, mixture.rows_per_shard))
    splits = {split: _finish_split(out, split, mixture.rows_per_shard) for split in SPLITS}
    shutil.rmtree(out / _TMP, ignore_errors=True)
    seconds = time.perf_counter() - started
    measured = {"tokens_measured": collator is not None, "measured_with": measured_with if collator is not None else None}
    manifest = _manifest(out, mixture, the_plan, kept, skipped, splits, measured, student, max_length, command, seconds)
    for name, entry in manifest["sources"].items():
        counts_line = ", ".join(f"{entry['kept'][s]:,} {s}" for s in SPLITS)
        print(f"[prepare] {name}: kept {counts_line}; skipped {entry['skipped']:,}", flush=True)
    rows = sum(entry["rows"] for entry in splits.values())
    print(f"[prepare] wrote {rows:,} rows in {sum(len(e['files']) for e in splits.values())} shards "
          f"({manifest['rows_per_second']:.1f} rows/s) and {out / MANIFEST}", flush=True)  # fmt: skip
    return manifest


def _clear(out: Path) -> None:
    """Remove what an earlier preparation left in ``out``; refuse a directory holding anything else."""
    if out.exists():
        ours = {*out.glob("*.parquet"), out / MANIFEST, out / _TMP}
        foreign = [p.name for p in out.iterdir() if p not in ours]
        if foreign:
            raise MixtureError(
                f"--out {out} holds other files ({', '.join(sorted(foreign)[:3])}); choose an empty or shard-only directory."
            )
        for path in ours:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _gather(results, mixture: Mixture, on_error: str, total_chunks: int) -> tuple[dict, dict]:
    """Stream the chunk results: per source, rows kept per split and skipped rows; progress every few seconds.
    With ``on_error="raise"`` the first skipped row stops the job."""
    kept = {source.name: dict.fromkeys(SPLITS, 0) for source in mixture.sources}
    skipped: dict[str, list] = {source.name: [] for source in mixture.sources}
    done, started, last = 0, time.perf_counter(), time.perf_counter()
    for result in results.iter_rows():
        name = mixture.sources[result["source"]].name
        for split, n in json.loads(result["kept"]).items():
            kept[name][split] += n
        problems = json.loads(result["skipped"])
        if problems and on_error == "raise":
            first = problems[0]
            raise MixtureError(f"source {name!r}, row {first['id']}: {first['reason']}; fix the record or {SKIP_HINT}.")
        skipped[name] += problems
        done += 1
        if time.perf_counter() - last >= _PROGRESS_SECONDS or done == total_chunks:
            last = time.perf_counter()
            rows = sum(sum(k.values()) for k in kept.values())
            bad = sum(len(s) for s in skipped.values())
            rate = rows / max(last - started, 1e-9)
            print(f"[prepare] converted {done}/{total_chunks} chunks: {rows:,} rows kept, {bad:,} skipped ({rate:.1f} rows/s)",
                  flush=True)  # fmt: skip
    return kept, skipped


def _finish_split(out: Path, split: str, rows_per_shard: int) -> dict:
    """Move one split's chunk files into ``{split}-{i:05d}.parquet`` in input order: ``train`` one shard per
    chunk, ``val``/``test`` packed into shards of ``rows_per_shard`` rows (streamed, one shard in memory)."""
    parts = sorted((out / _TMP / split).glob("*.parquet"))
    files: list[Path] = []
    if split == "train":
        for part in parts:
            files.append(out / f"{split}-{len(files):05d}.parquet")
            os.replace(part, files[-1])
    else:
        pending: list[pa.Table] = []

        def flush() -> None:
            files.append(out / f"{split}-{len(files):05d}.parquet")
            pq.write_table(pa.concat_tables(pending), files[-1])
            pending.clear()

        for part in parts:
            table = pq.read_table(part, schema=SCHEMA)
            while table.num_rows:
                room = rows_per_shard - sum(t.num_rows for t in pending)
                pending.append(table.slice(0, room))
                table = table.slice(room)
                if sum(t.num_rows for t in pending) == rows_per_shard:
                    flush()
        if pending:
            flush()
    return {"files": [f.name for f in files], "rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files)}


def _manifest(out: Path, mixture: Mixture, the_plan: Plan, kept: dict, skipped: dict, splits: dict, measured: dict,
              student: str | None, max_length: int | None, command: str, seconds: float) -> dict:  # fmt: skip
    """The manifest (written atomically to ``manifest.json`` beside the shards): per source what was read,
    taken, kept per split and skipped (each row's id and reason), and a fingerprint of its input."""
    sources = {}
    for s, source in enumerate(mixture.sources):
        described = {k: v for k, v in asdict(source).items() if v not in (None, "", {}, 0)}
        sources[source.name] = {
            **described,
            "records": the_plan.records[s],
            "taken": the_plan.taken[s],
            "kept": kept[source.name],
            "skipped": len(skipped[source.name]),
            "skipped_rows": sorted(skipped[source.name], key=lambda problem: int(problem["id"].rsplit("/", 1)[1])),
            "fingerprint": _source_fingerprint(source),
        }  # fmt: skip
    rows = sum(entry["rows"] for entry in splits.values())
    manifest = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "command": command,
        "seed": mixture.seed,
        "holdout": mixture.holdout,
        "rows_per_shard": mixture.rows_per_shard,
        "student": student,
        "max_length": max_length,
        **measured,
        "seconds": round(seconds, 1),
        "rows_per_second": rows / max(seconds, 1e-9),
        "sources": sources,
        "splits": splits,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    return manifest


def _source_fingerprint(source: Source) -> str:
    """A fingerprint of a source: its input files' contents, its image folder's file names and sizes (a
    million images are not re-read), the synthetic task's settings."""
    if source.format == "synthetic":
        return hashlib.sha256(json.dumps(source.options, sort_keys=True).encode()).hexdigest()[:16]
    files = fingerprint([source.path])
    return f"{files}+{fingerprint([source.image_root], content=False)}" if source.image_root else files
