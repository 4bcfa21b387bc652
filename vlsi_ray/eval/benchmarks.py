"""Benchmark readers: every set becomes a list of :class:`Item` (images, prompt, gold answer, categories).

Supported inputs:

- **synthetic**: the project's test split (``read_rows(dir, split="test")``), scored task types only;
  the prompt is the row's own user text (the format the models were trained on), category = task.
- **multiple choice, VLMEvalKit TSV** (MMBench / AI2D / MMMU / MMStar style): columns ``index``,
  ``image``, ``question``, ``answer`` (a letter) and option columns ``A``, ``B``, ... (any of A–Z that
  exist; empty cells are absent options), optional ``hint`` and ``category``. The prompt is the hint,
  the question, the lettered options and :data:`MCQ_INSTRUCTION`.
- **yes/no, POPE**: VLMEvalKit's ``POPE.tsv`` (``index``, ``image``, ``question``, ``answer`` Yes/No,
  optional ``category``, which may list several comma-separated categories: the item counts in each),
  or the original POPE JSON lines (``{"question_id", "image": file name, "text", "label": yes/no}``,
  images read from ``image_root``, category = the file's stem, e.g. ``coco_pope_random``). The prompt
  is the question and :data:`YES_NO_INSTRUCTION`.

In VLMEvalKit TSVs the ``image`` cell is base64 (a JSON list of base64 strings for several images),
or, to save space, the ``index`` of another row holding the image (a cell of at most 64 characters);
both are resolved here. Empty cells follow pandas' default NA strings (``""``, ``nan``, ``None``, ...),
as VLMEvalKit reads TSVs with pandas. Rows that cannot be used (bad base64, not an image, an answer
that is not one of the row's options) are skipped and counted (``on_error="skip"``) or raise.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlsi_ray.data.shards import read_rows
from vlsi_ray.data.synthetic import LETTERS, OPTIONS, SCORED_TASKS

log = logging.getLogger(__name__)

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
YES_NO_INSTRUCTION = "Please answer yes or no."
#: pandas' default NA strings: VLMEvalKit reads TSVs with pandas, so these cells are empty there.
NA_STRINGS = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)
TSV_COLUMNS = ("index", "image", "question", "answer")
POPE_JSON_KEYS = ("question_id", "image", "text", "label")
CHOICE, YES_NO = "choice", "yes_no"


class BenchmarkError(ValueError):
    """A benchmark file cannot be read; the message names the file, the row or column, and the fix."""


@dataclass
class Item:
    """One question: ``images`` (encoded image bytes), the full user ``prompt``, the gold ``answer``.

    ``kind`` is ``"choice"`` (answer = option letter, ``options`` = {letter: text}) or ``"yes_no"``
    (answer = ``"yes"``/``"no"``). ``categories`` are the groups the item is scored in.
    """

    index: str
    images: list[bytes]
    prompt: str
    answer: str
    kind: str
    categories: list[str]
    options: dict[str, str] = field(default_factory=dict)


@dataclass
class Benchmark:
    """A named list of items plus what reading it skipped (``skipped``: index -> reason)."""

    name: str
    format: str  # "synthetic", "mcq_tsv", "pope_tsv", "pope_jsonl"
    source: str
    items: list[Item]
    skipped: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- prompts
def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """``hint`` (if any), the question, one ``"X. option"`` line per option, then :data:`MCQ_INSTRUCTION`."""
    lines = ([hint] if hint else []) + [question] + [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines + [MCQ_INSTRUCTION])


def yes_no_prompt(question: str) -> str:
    """The question followed by :data:`YES_NO_INSTRUCTION` (not repeated if the question has it)."""
    question = question.strip()
    if question.lower().endswith(YES_NO_INSTRUCTION.lower()):
        return question
    return f"{question}\n{YES_NO_INSTRUCTION}"


# --------------------------------------------------------------------------------------- readers
def synthetic_benchmark(data_dir: str | Path, split: str = "test", on_error: str = "skip") -> Benchmark:
    """The synthetic task's ``split`` as choice items, one category per task type (captions dropped)."""
    rows, stats = read_rows(data_dir, split=split, on_error=on_error)
    items = []
    for row in rows:
        if row["task"] not in SCORED_TASKS:
            continue
        user = next(m for m in json.loads(row["messages"]) if m["role"] == "user")
        prompt = "".join(p["text"] for p in user["content"] if p.get("type") == "text")
        items.append(
            Item(
                row["id"],
                [bytes(image) for image in row["images"]],
                prompt,
                row["answer"],
                CHOICE,
                [row["task"]],
                dict(zip(LETTERS, OPTIONS[row["task"]])),
            )
        )
    return Benchmark("synthetic", "synthetic", str(data_dir), items, dict(stats.reasons))


def mcq_benchmark(path: str | Path, on_error: str = "skip") -> Benchmark:
    """Read a VLMEvalKit multiple-choice TSV (see module docstring) into choice items."""
    path = Path(path)
    _check_on_error(on_error)
    rows = _read_tsv(path)
    letters = [c for c in string.ascii_uppercase if c in rows[0]]
    if len(letters) < 2:
        raise BenchmarkError(
            f"{path} has option columns {letters or 'none'}; a multiple-choice TSV needs at least columns A and B."
        )
    images = _image_cells(rows)
    bench = Benchmark(path.stem, "mcq_tsv", str(path), [])
    for row in rows:
        index = row["index"]
        try:
            options = {k: row[k].strip() for k in letters if not _empty(row[k])}
            answer = row["answer"].strip().upper()
            if answer not in options:
                raise BenchmarkError(f"answer {row['answer']!r} is not one of its options {sorted(options)}")
            hint = None if _empty(row.get("hint")) else row["hint"].strip()
            category = "all" if _empty(row.get("category")) else row["category"].strip()
            bench.items.append(
                Item(
                    index,
                    _decode_images(images[index]),
                    mcq_prompt(row["question"].strip(), options, hint),
                    answer,
                    CHOICE,
                    [category],
                    options,
                )
            )
        except BenchmarkError as exc:
            _bad_row(bench, path, index, str(exc), on_error)
    return _checked(bench)


def yes_no_benchmark(path: str | Path, image_root: str | Path | None = None, on_error: str = "skip") -> Benchmark:
    """Read a POPE set: VLMEvalKit's TSV, or the original JSON lines (``.json``/``.jsonl``) with ``image_root``."""
    path = Path(path)
    _check_on_error(on_error)
    if path.suffix.lower() in (".json", ".jsonl"):
        return _pope_jsonl(path, Path(image_root) if image_root else path.parent, on_error)
    rows = _read_tsv(path)
    images = _image_cells(rows)
    bench = Benchmark(path.stem, "pope_tsv", str(path), [])
    for row in rows:
        index = row["index"]
        try:
            answer = _yes_no_label(row["answer"])
            cats = [] if _empty(row.get("category")) else [c.strip() for c in row["category"].split(",") if c.strip()]
            bench.items.append(
                Item(index, _decode_images(images[index]), yes_no_prompt(row["question"]), answer, YES_NO, cats or ["all"])
            )
        except BenchmarkError as exc:
            _bad_row(bench, path, index, str(exc), on_error)
    return _checked(bench)


def _pope_jsonl(path: Path, image_root: Path, on_error: str) -> Benchmark:
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {path} does not exist; pass an existing POPE .json/.jsonl file.")
    bench = Benchmark(path.stem, "pope_jsonl", str(path), [])
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        index = f"line {n}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"it is not JSON ({exc.msg})") from exc
            missing = [k for k in POPE_JSON_KEYS if k not in record]
            if missing:
                raise BenchmarkError(f"it lacks {missing} (POPE lines have {list(POPE_JSON_KEYS)})")
            index = str(record["question_id"])
            image = image_root / record["image"]
            if not image.is_file():
                raise BenchmarkError(f"image file {image} does not exist (pass --image-root)")
            data = image.read_bytes()
            _check_image(data)
            bench.items.append(
                Item(
                    index,
                    [data],
                    yes_no_prompt(record["text"]),
                    _yes_no_label(record["label"]),
                    YES_NO,
                    [str(record.get("category") or path.stem)],
                )
            )
        except BenchmarkError as exc:
            _bad_row(bench, path, index, str(exc), on_error)
    return _checked(bench)


# --------------------------------------------------------------------------------------- helpers
def _empty(value) -> bool:
    return value is None or value.strip() in NA_STRINGS


def _check_on_error(on_error: str) -> None:
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r} must be 'skip' or 'raise'.")


def _read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a VLMEvalKit TSV with every cell a string (short rows padded with "") and ``index`` stripped."""
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {path} does not exist; pass an existing TSV.")
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default 128 KiB field
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
    if not rows:
        raise BenchmarkError(f"{path} has no data rows; pass a non-empty TSV with a header line.")
    missing = [c for c in TSV_COLUMNS if c not in rows[0]]
    if missing:
        raise BenchmarkError(
            f"{path} has no column(s) {missing} (found {list(rows[0])}); add them: this format needs {list(TSV_COLUMNS)}."
        )
    for row in rows:
        row["index"] = row["index"].strip()
    return rows


def _image_cells(rows: list[dict]) -> dict[str, str]:
    """index -> image cell, with cells that name another row's index (<= 64 chars) followed."""
    cells = {r["index"]: r["image"].strip() for r in rows}
    out = {}
    for index, cell in cells.items():
        if len(cell) <= 64 and cell in cells and len(cells[cell]) > 64:
            cell = cells[cell]
        out[index] = cell
    return out


def _decode_images(cell: str) -> list[bytes]:
    if len(cell) <= 64:
        raise BenchmarkError(f"its image cell {cell!r} is neither base64 nor the index of a row with an image")
    try:
        encoded = json.loads(cell) if cell.startswith("[") else [cell]
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"its image cell starts with '[' but is not a JSON list of base64 strings ({exc.msg})") from exc
    images = []
    for text in encoded:
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BenchmarkError(f"its image is not valid base64 ({exc})") from exc
        _check_image(data)
        images.append(data)
    return images


def image_mime(data: bytes) -> str:
    """The MIME type of encoded image bytes from their magic number (PNG when unknown)."""
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def _check_image(data: bytes) -> None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types for bad bytes
        raise BenchmarkError(f"its image bytes do not decode as an image ({type(exc).__name__})") from exc


def _yes_no_label(value: str) -> str:
    label = (value or "").strip().lower()
    if label not in ("yes", "no"):
        raise BenchmarkError(f"answer {value!r} is not yes or no")
    return label


def _bad_row(bench: Benchmark, path: Path, index: str, reason: str, on_error: str) -> None:
    if on_error == "raise":
        raise BenchmarkError(f"row {index!r} of {path}: {reason}; fix the row or pass --on-error skip to skip and count it.")
    log.warning("skipping row %r of %s: %s", index, path, reason)
    bench.skipped[index] = reason


def _checked(bench: Benchmark) -> Benchmark:
    seen: set[str] = set()
    for item in bench.items:
        if item.index in seen:
            raise BenchmarkError(f"{bench.source} has index {item.index!r} twice; give every row a unique index.")
        seen.add(item.index)
    if not bench.items:
        raise BenchmarkError(
            f"{bench.source} has no usable rows ({len(bench.skipped)} skipped, e.g. "
            f"{next(iter(bench.skipped.values()), 'none')}); fix the file."
        )
    return bench
