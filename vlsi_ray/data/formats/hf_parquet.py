"""Hugging Face datasets saved as Parquet (``Dataset.to_parquet``) or Arrow (``save_to_disk``): one record per row.

Images are in an ``image`` or ``images`` column as ``{"bytes", "path"}`` structs (the ``datasets``
Image feature) or lists of them; bytes are used when present, else the path (relative to
``image_root``). The conversation is a ``messages`` column (role/content, as in :mod:`.sharegpt`; image
parts and ``<image>`` placeholders take the row's images in order), a ``conversations`` column
(from/value, as in :mod:`.llava`), or a ``question`` + ``answer`` pair (VQA sets: the images, then the
question; a list of answers gives its first). The id is the ``id`` or ``question_id`` column, else the
row's position.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlsi_ray.data.formats import BadRecord, Format, Source, image_bytes, image_file, images_first, make_row, text_parts
from vlsi_ray.data.formats.llava import ROLES as LLAVA_ROLES

SUFFIXES = (".parquet", ".arrow")


def files(source: Source) -> list[Path]:
    """The source's Parquet / Arrow files (a file, or every one under a directory)."""
    path = Path(source.path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else []


def records(source: Source, path: Path) -> Iterator[dict]:
    """The rows of one Parquet or Arrow (IPC stream or file) table as dicts."""
    for batch in _batches(path):
        yield from batch.to_pylist()


def _batches(path: Path) -> Iterator[pa.RecordBatch]:
    if path.suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=256)
        return
    with path.open("rb") as fh:
        head = fh.read(6)
    if head == b"ARROW1":  # the IPC file format
        reader = pa.ipc.open_file(path)
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:  # the IPC stream format (datasets' save_to_disk)
        yield from pa.ipc.open_stream(path)


def _images(source: Source, record: dict) -> list[bytes]:
    column = record.get("images", record.get("image"))
    if column is None:
        return []
    entries = column if isinstance(column, list) else [column]
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and entry.get("bytes"):
            out.append(image_bytes(entry["bytes"], f"image {i}"))
        elif isinstance(entry, dict) and entry.get("path"):
            out.append(image_file(source, entry["path"]))
        elif isinstance(entry, (bytes, bytearray)):
            out.append(image_bytes(bytes(entry), f"image {i}"))
        else:
            raise BadRecord(f"image {i} has neither bytes nor a path")
    return out


def _messages(record: dict, images: int) -> list[dict]:
    if isinstance(record.get("messages"), list):
        messages = []
        for turn in record["messages"]:
            content = turn.get("content")
            parts = text_parts(content) if isinstance(content, str) else [
                {"type": "image"} if p.get("type") in ("image", "image_url") else {"type": "text", "text": p.get("text") or ""}
                for p in content or []
            ]  # fmt: skip
            messages.append({"role": turn.get("role"), "content": parts})
        return messages
    if isinstance(record.get("conversations"), list):
        return [{"role": LLAVA_ROLES.get(str(t.get("from", "")).lower(), t.get("from")), "content": text_parts(t.get("value") or "")}
                for t in record["conversations"]]  # fmt: skip
    if isinstance(record.get("question"), str) and record.get("answer", record.get("answers")) is not None:
        answer = record.get("answer", record.get("answers"))
        answer = answer[0] if isinstance(answer, list) and answer else answer
        question = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": record["question"]}]
        return [{"role": "user", "content": question}, {"role": "assistant", "content": [{"type": "text", "text": str(answer)}]}]
    raise BadRecord("no 'messages', 'conversations' or 'question' + 'answer' columns")


def convert(source: Source, record: dict, number: int) -> dict:
    """One table row -> a schema row (images from the row's own bytes or paths)."""
    images = _images(source, record)
    messages = _messages(record, len(images))
    images_first(messages, len(images))
    if any(m["role"] not in ("system", "user", "assistant") for m in messages):
        raise BadRecord("a turn has a role that is not system, user or assistant")
    task = record.get("task") if isinstance(record.get("task"), str) else None
    return make_row(source, number, messages, images, task=task)


def count(source: Source, path: Path) -> int:
    """Rows of one table, from its metadata (Parquet footer, Arrow batches) without reading images."""
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    return sum(batch.num_rows for batch in _batches(path))


FORMAT = Format(files=files, records=records, convert=convert, count=count)
