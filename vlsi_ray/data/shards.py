"""Parquet shards: the one row schema, the writer, the synthetic task's cached generation, the validating reader.

Layout of a dataset directory::

    manifest.json                 how the shards were made (the synthetic generator's settings, or
                                  jobs/prepare_data.py's sources, counts and skipped rows)
    train-00000.parquet ...       {split}-{i:05d}.parquet, fixed SCHEMA

Every row, whatever its source, has one shape (:data:`SCHEMA`): an ``id``, zero or more ``images``
(encoded bytes, in the order of the conversation's image parts), ``messages`` (the Hugging Face chat
format as JSON: an optional system turn, then user and assistant turns; every assistant turn is
trained on), a free-form ``task`` and ``source``, an optional scorable ``answer`` (the synthetic
task's option letter, a multiple-choice letter), the ``split`` and, once measured, ``tokens`` (its
length with the student's processor, image tokens included). ``validate_row`` is pure and cheap so
that Ray Data can reuse it inside ``map_batches``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlsi_ray.data.synthetic import GENERATOR_VERSION, generate_rows

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("images", pa.list_(pa.binary())),
        ("messages", pa.string()),
        ("answer", pa.string()),
        ("task", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("tokens", pa.int32()),
    ]
)
#: Required fields and their Python types as rows read back (``answer`` and ``tokens`` may be null).
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "images": (list, tuple),
    "messages": (str,),
    "task": (str,),
    "source": (str,),
    "split": (str,),
}
ROLES = ("system", "user", "assistant")
#: The splits a dataset directory holds, each as ``{split}-*.parquet`` shards.
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
GENERATE_HINT = "generate it with vlsi_ray.data.shards.generate_dataset(out_dir, sizes, seed)"
SKIP_HINT = "set data.on_error=skip to skip and count such rows"


class CorruptRowError(ValueError):
    """A shard row failed validation while reading with on_error="raise"."""


@dataclass
class ReadStats:
    """What ``read_rows`` saw: rows read, kept and skipped, with each skipped id and its reason."""

    read: int = 0
    kept: int = 0
    skipped: int = 0
    skipped_ids: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- images
def decode_image(png_bytes: bytes) -> Image.Image:
    """Decode image bytes (PNG) into an RGB PIL image."""
    return Image.open(io.BytesIO(png_bytes)).convert("RGB")


def _image_problem(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # checks structure and CRCs without decoding
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # catches truncated pixel data that verify() can miss
    except Exception as e:  # PIL raises many types for bad bytes
        return f"image does not decode ({type(e).__name__})"
    return None


# ------------------------------------------------------------------------------------- validation
def _parts(turn: dict) -> list[dict] | None:
    """A turn's content as typed parts (a plain string is one text part), or None when malformed."""
    content = turn.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content):
        return content
    return None


def messages_problem(text: str, images: int) -> str | None:
    """What is wrong with a row's ``messages`` JSON for ``images`` images, or None.

    A non-empty list of turns with roles system (first only), user and assistant, each content a
    string or typed parts; at least one assistant turn with text (what the row trains on); as many
    image parts as the row has images.
    """
    try:
        turns = json.loads(text)
    except ValueError:
        return "messages is not valid JSON"
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        return "messages is not a non-empty list of turns"
    parts = [_parts(t) for t in turns]
    for i, (turn, content) in enumerate(zip(turns, parts)):
        if turn.get("role") not in ROLES or (turn["role"] == "system" and i > 0):
            return f"turn {i} has role {turn.get('role')!r}; use system (first only), user or assistant"
        if content is None:
            return f"turn {i}'s content is neither a string nor a list of typed parts"
    answered = any(
        turn["role"] == "assistant" and "".join(p.get("text", "") for p in content if p["type"] == "text").strip()
        for turn, content in zip(turns, parts)
    )
    if not answered:
        return "messages has no assistant turn with text to learn from"
    placeholders = sum(1 for content in parts for p in content if p["type"] == "image")
    if placeholders != images:
        return f"messages have {placeholders} image parts but the row has {images} images"
    return None


def validate_row(row: Mapping) -> str | None:
    """Return a one-phrase description of what is wrong with ``row``, or None if it is usable.

    Checks field presence and types, a non-empty id and task, the conversation
    (:func:`messages_problem`: turns, an assistant answer, one image part per image) and that every
    image decodes. Text-only rows (no images) and rows of several images are fine.
    """
    for name, types in FIELD_TYPES.items():
        if name not in row or row[name] is None:
            return f"missing field '{name}'"
        if not isinstance(row[name], types):
            return f"field '{name}' is {type(row[name]).__name__}, expected {types[0].__name__}"
    if not row["id"].strip():
        return "empty id"
    if not row["task"].strip():
        return "empty task"
    images = [bytes(image) for image in row["images"]]
    problem = messages_problem(row["messages"], len(images))
    for i, data in enumerate(images):
        if problem is not None:
            break
        problem = _image_problem(data)
        if problem is not None and len(images) > 1:
            problem = f"image {i}: {problem}"
    return problem


# ----------------------------------------------------------------------------------------- writing
def _write_table(rows: Sequence[Mapping], path: Path) -> None:
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a crash never leaves a half-written shard under the final name


def write_shards(rows: Sequence[Mapping], out_dir: str | os.PathLike, split: str, rows_per_shard: int = 1000) -> list[Path]:
    """Write ``rows`` as ``{split}-{i:05d}.parquet`` files in ``out_dir`` and return their paths.

    Older shards of the same split in ``out_dir`` are removed first, so readers never mix runs.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard={rows_per_shard} must be >= 1.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{split}-*.parquet"):
        old.unlink()
    paths = []
    for i, start in enumerate(range(0, len(rows), rows_per_shard)):
        path = out / f"{split}-{i:05d}.parquet"
        _write_table(rows[start : start + rows_per_shard], path)
        paths.append(path)
    return paths


def _normalise(obj):
    return json.loads(json.dumps(obj, sort_keys=True))  # tuples → lists, so manifests compare


def _params(seed: int, sizes: Mapping[str, int], rows_per_shard: int, kwargs: Mapping) -> dict:
    return _normalise(
        {
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "sizes": dict(sizes),
            "rows_per_shard": rows_per_shard,
            "generator_kwargs": dict(kwargs),
        }
    )


def load_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The dataset's manifest, or None when there is none or it is unreadable."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def generate_dataset(
    out_dir: str | os.PathLike, sizes: Mapping[str, int], seed: int, rows_per_shard: int = 1000, **generator_kwargs
) -> dict:
    """Generate every split of ``sizes`` into ``out_dir`` and write ``manifest.json``; return it.

    Cached: if the manifest has identical parameters and all its files exist, nothing is rewritten.
    ``generator_kwargs`` go to ``synthetic.generate_rows`` (tasks, caption_fraction, difficulty...).
    """
    out = Path(out_dir)
    params = _params(seed, sizes, rows_per_shard, generator_kwargs)
    old = load_manifest(out)
    if (
        old is not None
        and {k: old.get(k) for k in params} == params
        and all((out / f).is_file() for s in old["splits"].values() for f in s["files"])
    ):
        print(f"[data] reusing {out} (manifest matches: seed={seed}, sizes={dict(sizes)})")
        return old
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest is written last: it marks completion
    for split, entry in (old or {}).get("splits", {}).items():
        if split not in sizes:  # a split dropped from sizes must not be read back stale
            for name in entry.get("files", []):
                (out / name).unlink(missing_ok=True)
    splits = {}
    for split, n in sizes.items():
        t0 = time.perf_counter()
        rows = generate_rows(split, n, seed, **generator_kwargs)
        paths = write_shards(rows, out, split, rows_per_shard)
        dt = time.perf_counter() - t0
        print(f"[data] {split}: {n} rows -> {len(paths)} shard(s) in {dt:.1f}s ({n / max(dt, 1e-9):.0f} rows/s)")
        splits[split] = {"files": [p.name for p in paths], "rows": n}
    manifest = {**params, "splits": splits}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, out / MANIFEST)
    return manifest


# ----------------------------------------------------------------------------------------- reading
def shard_files(source: str | os.PathLike | Iterable[str | os.PathLike], split: str | None = None) -> list[Path]:
    """Resolve a dataset directory (optionally one split's shards) or a list of files to paths."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(f"Data directory {root} does not exist; {GENERATE_HINT}.")
        files = sorted(root.glob(f"{split}-*.parquet" if split else "*.parquet"))
        if not files:
            what = f"'{split}' shards ({split}-*.parquet)" if split else "Parquet shards"
            raise FileNotFoundError(f"No {what} in {root}; {GENERATE_HINT}.")
        return files
    files = [Path(f) for f in source]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise FileNotFoundError(f"Shard file(s) {missing or '[]'} not found; pass existing Parquet files or {GENERATE_HINT}.")
    return files


def read_rows(
    source: str | os.PathLike | Iterable[str | os.PathLike],
    split: str | None = None,
    on_error: str = "skip",
    ids: Collection[str] | None = None,
) -> tuple[list[dict], ReadStats]:
    """Read and validate rows from a dataset directory or a list of Parquet files.

    With a directory, ``split`` selects its ``{split}-*.parquet`` shards; with a list of files it
    keeps rows whose ``split`` field matches. ``ids``: only those rows are read (filtered as each shard
    is read, so the others' images never reach memory). Bad rows are logged and counted
    (``on_error="skip"``) or raise ``CorruptRowError`` (``on_error="raise"``).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r} must be 'skip' or 'raise'.")
    from_list = not isinstance(source, (str, os.PathLike))
    stats = ReadStats()
    kept = []
    for path in shard_files(source, split):
        stats.files.append(str(path))
        try:
            rows = pq.read_table(path, filters=None if ids is None else [("id", "in", list(ids))]).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"File {path} is not a readable Parquet shard ({e}); delete it and regenerate the data.") from e
        for i, row in enumerate(rows):
            if from_list and split is not None and row.get("split") != split:
                continue
            stats.read += 1
            problem = validate_row(row)
            if problem is None:
                kept.append(row)
                continue
            rid = row.get("id") if isinstance(row.get("id"), str) and row["id"].strip() else f"{path.name}#{i}"
            if on_error == "raise":
                raise CorruptRowError(f"Row {rid!r} in {path} is corrupt ({problem}); {SKIP_HINT}.")
            log.warning("skipping row %r in %s: %s", rid, path, problem)
            stats.skipped += 1
            stats.skipped_ids.append(rid)
            stats.reasons[rid] = problem
    stats.kept = len(kept)
    return kept, stats
