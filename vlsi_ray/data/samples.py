"""Small sample sources in the formats instruction data ships in, written on the spot (no download).

:func:`write_samples` writes, under one folder, a LLaVA JSON file with an image folder, a ShareGPT JSON
Lines file, a Hugging Face Parquet set (VQA columns, ``{bytes, path}`` image structs) and a Hugging
Face Arrow set (``save_to_disk``'s stream files: a ``messages`` column and an ``images`` list), plus a
mixture file over them and the synthetic task. Every kind of row a real mixture holds is there:
one image, two images, a three-turn conversation with a system turn, text only, images without
placeholders, inline (base64) images; and every kind of bad row, each named by its record id so that a
test can follow it: a missing image file, a corrupt image, an over-long answer, no assistant turn, a
placeholder/image count mismatch, a line that is not JSON, an unknown role.

Used by the tests and by ``python jobs/prepare_data.py --write-samples DIR`` (try the converter offline).
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (30, 150, 60), "blue": (40, 80, 220), "yellow": (235, 195, 20)}
LETTERS = "ABCD"
#: Record ids of the sample rows that a conversion must skip, per source, with a word of their reason.
BAD = {
    "llava_sample": {"missing-image": "missing image file", "corrupt-image": "not a readable image",
                     "no-answer": "no assistant turn", "mismatch": "placeholders for", "over-long": "over-long"},
    "sharegpt_sample": {"not-json": "not valid JSON", "unknown-role": "role"},
    "vqa_sample": {"corrupt-bytes": "not a readable image"},
}  # fmt: skip
#: Words in the over-long sample answer: far past any ``data.max_length`` a test uses, well within a real one.
LONG_ANSWER_WORDS = 1500


def picture(colour: str, size: int = 112, shape: str = "square", seed: int = 0, fmt: str = "PNG") -> bytes:
    """A ``size`` px picture of one ``colour`` shape on white, encoded as ``fmt`` (PNG or JPEG)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    x, y = rng.randrange(0, size // 2), rng.randrange(0, size // 2)
    box = (x, y, x + size // 2, y + size // 2)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def _colour_question(colour: str) -> tuple[str, str]:
    """(question, answer letter) of a colour multiple-choice question."""
    options = " ".join(f"{letter}. {name}" for letter, name in zip(LETTERS, COLOURS))
    return f"What colour is the shape? {options} Answer with the option's letter.", LETTERS[list(COLOURS).index(colour)]


def _sum_question(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(2, 50), rng.randrange(2, 50)
    return f"What is {a} + {b}? Explain briefly.", f"{a} plus {b} makes {a + b}, so the answer is {a + b}."


def _llava(folder: Path, images: Path, rows: int, rng: random.Random) -> Path:
    names = list(COLOURS)
    question, letter = _colour_question("red")
    records = [
        {"id": "single", "image": "red-0.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": letter}]},
        {"id": "two-images", "image": ["red-0.png", "blue-1.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich picture is blue? A. the first B. the second"},
            {"from": "gpt", "value": "B"}]},
        {"id": "three-turn", "image": "green-2.png", "conversations": [
            {"from": "system", "value": "You are a careful assistant."},
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A green square."},
            {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "Near the top left corner."},
            {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "One."}]},
        {"id": "text-only", "conversations": [
            {"from": "human", "value": "Name a primary colour."}, {"from": "gpt", "value": "Red is a primary colour."}]},
        {"id": "no-placeholder", "image": "yellow-3.png", "conversations": [
            {"from": "human", "value": "Describe the picture."}, {"from": "gpt", "value": "A yellow square on white."}]},
        {"id": "missing-image", "image": "absent.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A shape."}]},
        {"id": "corrupt-image", "image": "corrupt.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A shape."}]},
        {"id": "no-answer", "image": "red-0.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]},
        {"id": "mismatch", "image": "red-0.png", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare them."}, {"from": "gpt", "value": "They match."}]},
        {"id": "over-long", "image": "blue-1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nTell me everything."},
            {"from": "gpt", "value": " ".join(rng.choice(names) for _ in range(LONG_ANSWER_WORDS))}]},
    ]  # fmt: skip
    for i in range(rows):
        colour = names[i % len(names)]
        question, letter = _colour_question(colour)
        (images / f"fill-{i}.png").write_bytes(picture(colour, shape=("square", "circle")[i % 2], seed=i))
        records.append({"id": f"fill-{i}", "image": f"fill-{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": letter}]})  # fmt: skip
    path = folder / "llava.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def _sharegpt(folder: Path, rows: int, rng: random.Random) -> Path:
    inline = "data:image/png;base64," + base64.b64encode(picture("green", seed=7)).decode()
    question, letter = _colour_question("green")
    lines = [
        {"id": "inline-image", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": inline}}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": letter}]},
        {"id": "listed-images", "images": ["red-0.png", "blue-1.jpg"], "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "<image><image>Are the two colours the same?"},
            {"role": "assistant", "content": "No, one is red and one is blue."}]},
        {"id": "unknown-role", "messages": [{"role": "bot", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]},
    ]  # fmt: skip
    for i in range(rows):
        question, answer = _sum_question(rng)
        lines.append(
            {"id": f"math-{i}", "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        )
    text = [json.dumps(line) for line in lines]
    text.insert(2, '{"id": "not-json", "messages": [')  # a truncated line
    path = folder / "sharegpt.jsonl"
    path.write_text("\n".join(text) + "\n")
    return path


def _vqa_parquet(folder: Path, rows: int) -> Path:
    """A VQA set as ``datasets`` saves it to Parquet: ``image`` a ``{bytes, path}`` struct."""
    records = []
    for i in range(rows):
        colour = list(COLOURS)[i % len(COLOURS)]
        question, letter = _colour_question(colour)
        answer = [letter, letter.lower()] if i % 3 == 0 else letter  # some sets list several answers
        records.append({"question_id": f"q{i}", "image": {"bytes": picture(colour, seed=100 + i), "path": f"{i}.png"},
                        "question": question, "answer": answer if isinstance(answer, list) else [answer]})  # fmt: skip
    records.append({"question_id": "corrupt-bytes", "image": {"bytes": b"\x89PNG not really", "path": "corrupt-bytes.png"},
                    "question": "What is it?", "answer": ["A"]})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("question_id", pa.string()), ("image", image_type), ("question", pa.string()), ("answer", pa.list_(pa.string()))]
    )
    pq.write_table(pa.Table.from_pylist(records, schema=schema), folder / "train-00000-of-00001.parquet")
    return folder


def _chart_arrow(folder: Path, rows: int) -> Path:
    """A two-image set as ``datasets.save_to_disk`` writes it: an Arrow stream file with an ``images`` list."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("images", pa.list_(image_type)), ("messages", pa.list_(turn))])
    records = []
    for i in range(rows):
        a, b = list(COLOURS)[i % 4], list(COLOURS)[(i + 1) % 4]
        records.append({"id": f"chart-{i}",
                        "images": [{"bytes": picture(a, seed=200 + i), "path": None}, {"bytes": picture(b, seed=300 + i), "path": None}],
                        "messages": [{"role": "user", "content": "<image>\n<image>\nWhich colours are shown?"},
                                     {"role": "assistant", "content": f"The first is {a} and the second is {b}."}]})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(pa.Table.from_pylist(records, schema=schema))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return folder


def write_samples(out: str | Path, rows: int = 24, seed: int = 0, synthetic: dict | None = None) -> Path:
    """Write the sample sources under ``out`` (``rows`` good filler records per source besides the named
    cases) and ``out/mixture.yaml`` over them; return the mixture file's path.

    ``synthetic``: the synthetic task's split sizes as one more source (default 24 train, 4 val, 8 test).
    """
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    (images / "red-0.png").write_bytes(picture("red", seed=0))
    (images / "blue-1.jpg").write_bytes(picture("blue", seed=1, fmt="JPEG"))
    (images / "green-2.png").write_bytes(picture("green", seed=2))
    (images / "yellow-3.png").write_bytes(picture("yellow", seed=3))
    (images / "corrupt.png").write_bytes(picture("red", seed=4)[:60])  # a truncated PNG
    sizes = synthetic or {"train": 24, "val": 4, "test": 8}
    mixture = {
        "sources": [
            {"name": "llava_sample", "format": "llava", "path": str(_llava(out, images, rows, rng)), "image_root": str(images)},
            {"name": "sharegpt_sample", "format": "sharegpt", "path": str(_sharegpt(out, rows, rng)), "image_root": str(images)},
            {"name": "vqa_sample", "format": "hf_parquet", "path": str(_vqa_parquet(out / "vqa", rows))},
            {"name": "chart_sample", "format": "hf_parquet", "path": str(_chart_arrow(out / "charts", rows))},
            {"name": "shapes", "format": "synthetic", **sizes, "seed": seed},
        ],
        "holdout": {"val": 2, "test": 2},
        "seed": seed,
        "rows_per_shard": 16,
    }
    path = out / "mixture.yaml"
    path.write_text(yaml.safe_dump(mixture, sort_keys=False))
    return path
