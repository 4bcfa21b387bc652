"""Converters from the formats instruction data ships in to the one row schema (:data:`vlsi_ray.data.shards.SCHEMA`).

A format is one module (``llava.py``, ``sharegpt.py``, ``hf_parquet.py``, ``synthetic.py``) defining
a :class:`Format`; registering it is one line in :data:`FORMATS`. A format says which files a
source's ``path`` holds (:attr:`Format.files`, on the driver, cheap), how one file becomes raw
records (:attr:`Format.records`, in a worker) and how one record becomes a row
(:attr:`Format.convert`, in a worker: images are read and checked there). A record that cannot be
converted raises :class:`BadRecord` with a one-phrase reason; the preparation job
(:mod:`vlsi_ray.data.mixture`) skips and counts it, or stops on it (``on_error``).

A row's id is ``<source>/<n>``, ``n`` the record's place in its source (files in name order): unique
and stable whatever ids the records carry (released sets repeat theirs).
"""

from __future__ import annotations

import importlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

#: format name -> module that defines its ``FORMAT``. Adding a format: one module, one line here.
FORMATS: dict[str, str] = {
    "llava": "vlsi_ray.data.formats.llava",
    "sharegpt": "vlsi_ray.data.formats.sharegpt",
    "hf_parquet": "vlsi_ray.data.formats.hf_parquet",
    "synthetic": "vlsi_ray.data.formats.synthetic",
}
#: Image formats kept as they are (checked to decode); anything else is re-encoded as PNG.
KEPT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


class BadRecord(ValueError):
    """A source record that cannot become a row; the message is the reason (one phrase)."""


@dataclass(frozen=True)
class Source:
    """One entry of a mixture's ``sources``: a ``name`` (the rows' ``source``), a ``format``, a ``path``
    (a file or a directory), an ``image_root`` for relative image paths (default: the path's folder),
    a ``limit`` on the records taken (0: all, else the first ``limit`` in file order), a default ``task``
    for its rows (default: the name), its own ``holdout`` sizes (default: the mixture's) and
    format-specific ``options`` (the synthetic task's sizes and seed)."""

    name: str
    format: str
    path: str = ""
    image_root: str | None = None
    limit: int = 0
    task: str | None = None
    holdout: dict | None = None
    options: dict = field(default_factory=dict)

    @property
    def images_dir(self) -> Path:
        if self.image_root:
            return Path(self.image_root)
        path = Path(self.path)
        return path if path.is_dir() else path.parent


@dataclass(frozen=True)
class Format:
    """How one data format is read: ``files(source)`` -> input files; ``records(source, file)`` -> raw
    records of one file (dicts, in file order); ``convert(source, record, number)`` -> a row (with
    ``images`` as encoded bytes; ``number``: the record's place in its source), raising
    :class:`BadRecord`; ``count(source, file)`` -> the file's records (default: reads them);
    ``splits``: whether the format fixes each row's split itself (the synthetic task) instead of the
    mixture's holdout."""

    files: Callable[[Source], list[Path]]
    records: Callable[[Source, Path], Iterator[dict]]
    convert: Callable[[Source, dict, int], dict]
    count: Callable[[Source, Path], int] | None = None
    splits: bool = False

    def count_records(self, source: Source, path: Path) -> int:
        """How many records ``path`` holds."""
        if self.count is not None:
            return self.count(source, path)
        return sum(1 for _ in self.records(source, path))


def get_format(name: str) -> Format:
    """The :class:`Format` registered as ``name``."""
    if name not in FORMATS:
        raise ValueError(f"data format {name!r} is not supported; use one of {', '.join(FORMATS)}.")
    return importlib.import_module(FORMATS[name]).FORMAT


# ----------------------------------------------------------------------------------------- helpers
def read_json_records(path: Path) -> Iterator[dict]:
    """Records of a JSON list file or a JSON Lines file (one object per line)."""
    if path.suffix == ".jsonl":
        with path.open() as fh:
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        yield {"__error__": f"line {n} is not valid JSON ({err.msg})"}
        return
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a list of records; use a JSON list or JSON Lines.")
    yield from data


def json_files(source: Source) -> list[Path]:
    """A JSON / JSON Lines source: its file, or the ``*.json``/``*.jsonl`` files of its directory."""
    path = Path(source.path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl")) if path.is_dir() else []


def image_bytes(data: bytes, what: str) -> bytes:
    """``data`` if it decodes as a kept format (PNG, JPEG, WEBP), else re-encoded as RGB PNG; :class:`BadRecord`
    naming ``what`` when it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in KEPT_IMAGE_FORMATS and image.mode in ("RGB", "L"):
                return data
            out = io.BytesIO()
            image.convert("RGB").save(out, "PNG")
            return out.getvalue()
    except Exception as err:  # PIL raises many types for bad bytes
        raise BadRecord(f"{what} is not a readable image ({type(err).__name__})") from None


def image_file(source: Source, name: object) -> bytes:
    """The image at ``name`` (relative to the source's image folder, or absolute), checked (:func:`image_bytes`)."""
    if not isinstance(name, str) or not name:
        raise BadRecord(f"image entry {name!r} is not a file name")
    path = Path(name) if Path(name).is_absolute() else source.images_dir / name
    if not path.is_file():
        raise BadRecord(f"missing image file {path}")
    return image_bytes(path.read_bytes(), f"image file {path}")


def text_parts(text: str, placeholder: str = "<image>") -> list[dict]:
    """``"<image>\\nWhat is it?"`` -> ``[{"type": "image"}, {"type": "text", "text": "What is it?"}]``: each
    placeholder becomes an image part where it stands; the text around it is stripped of the newline
    the placeholder convention adds."""
    parts: list[dict] = []
    for i, piece in enumerate(text.split(placeholder)):
        if i:
            parts.append({"type": "image"})
        piece = piece.strip("\n") if i or placeholder in text else piece
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def count_images(messages: list[dict]) -> int:
    """Image parts in ``messages`` (turns with ``content`` as typed parts)."""
    return sum(1 for m in messages for p in m["content"] if p["type"] == "image")


def images_first(messages: list[dict], images: int) -> None:
    """Records with images but no placeholder (LLaVA's convention): the images go first in the first user turn."""
    first = next((m for m in messages if m["role"] == "user"), None)
    if images and count_images(messages) == 0 and first is not None:
        first["content"] = [{"type": "image"} for _ in range(images)] + first["content"]


#: A multiple-choice answer: one option letter, optionally bracketed or followed by ``.``/``:``/``)``.
_LETTER = re.compile(r"^\(?([A-Z])\)?[.:)]?$")


def scorable_answer(messages: list[dict]) -> str | None:
    """The option letter the last assistant turn answers (``"B"`` for ``"B"``, ``"(B)"``, ``"B."``), else None:
    the report scores accuracy on rows with such an answer."""
    for m in reversed(messages):
        if m["role"] == "assistant":
            match = _LETTER.match("".join(p.get("text", "") for p in m["content"] if p["type"] == "text").strip())
            return match.group(1) if match else None
    return None


def make_row(source: Source, number: int, messages: list[dict], images: list[bytes], task: str | None = None) -> dict:
    """A schema row of ``source``: id ``<source>/<number>``, the messages as JSON, the images, the task
    (the record's, else the source's ``task``, else its name), the answer when it is an option letter."""
    if count_images(messages) != len(images):
        raise BadRecord(f"{count_images(messages)} image placeholders for {len(images)} images")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn")
    return {
        "id": f"{source.name}/{number}",
        "images": images,
        "messages": json.dumps(messages),
        "answer": scorable_answer(messages),
        "task": task or source.task or source.name,
        "source": source.name,
        "split": "train",
        "tokens": None,
    }
