"""Tiny benchmark files in the supported formats, generated from the synthetic task's scenes.

Used by the tests (generated into a temporary directory) and by ``python jobs/eval.py
--write-fixtures DIR``. Every file exercises the format's corners:

- ``mcq.tsv`` (VLMEvalKit multiple choice): the synthetic questions with their fixed options A–D,
  category = task; every second row has a ``hint``; some rows leave option ``D`` empty (the answer is
  then never D).
- ``pope.tsv`` (VLMEvalKit POPE): three questions per image — an object that is there (``Yes``,
  categories ``adversarial,random``), an absent colour/shape pair (``No``, ``random``) and an
  absent pair sharing the colour or the shape of a present object (``No``, ``adversarial``), like
  POPE's negative sampling. Only the first row of an image holds its base64; the other two name that
  row's index, as VLMEvalKit does to save space.
- ``pope/synthetic_pope_{random,adversarial}.jsonl`` + ``pope/images/*.png``: the same questions in
  the original POPE layout (``question_id``, ``image``, ``text``, ``label``).

The returned :class:`FixtureSets` carries the gold answers and categories of every file, so tests
can compare what the readers parse with what was written.
"""

from __future__ import annotations

import base64
import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from vlsi_ray.data.synthetic import COLOURS, LETTERS, OPTIONS, SCORED_TASKS, SHAPES, generate_examples, render, to_png

HINT = "The board is a 4 x 4 grid of cells."


@dataclass
class FixtureSets:
    """Paths of the generated files and their gold ``{index: (answer, categories)}`` per file."""

    mcq: Path
    pope_tsv: Path
    pope_jsonl: list[Path]
    gold: dict[str, dict[str, tuple[str, list[str]]]] = field(default_factory=dict)


def write_fixture_sets(out_dir: str | Path, n_mcq: int = 10, n_images: int = 4, seed: int = 0) -> FixtureSets:
    """Write ``mcq.tsv`` (``n_mcq`` rows), ``pope.tsv`` and the POPE JSON lines (3 questions per image) into ``out_dir``."""
    out = Path(out_dir)
    (out / "pope" / "images").mkdir(parents=True, exist_ok=True)
    sets = FixtureSets(out / "mcq.tsv", out / "pope.tsv", [])

    rows, gold = [], {}
    for i, ex in enumerate(generate_examples("test", n_mcq, seed, tasks=SCORED_TASKS, max_objects=3)):
        options = dict(zip(LETTERS, OPTIONS[ex.task]))
        if i % 3 == 2 and ex.answer != "D":
            options["D"] = ""
        rows.append(
            {
                "index": i,
                "image": _b64(render(ex.scene)),
                "question": ex.question,
                "hint": HINT if i % 2 else "",
                **options,
                "answer": ex.answer,
                "category": ex.task,
            }
        )
        gold[str(i)] = (ex.answer, [ex.task])
    _write_tsv(sets.mcq, ["index", "image", "question", "hint", *LETTERS, "answer", "category"], rows)
    sets.gold["mcq"] = gold

    rng = random.Random(seed)
    rows, gold, jsonl = [], {}, {"random": [], "adversarial": []}
    scenes = generate_examples("test", n_images, seed + 1, tasks=["caption"], max_objects=3)
    for k, ex in enumerate(scenes):
        present = {(o.colour, o.shape) for o in ex.scene.objects}
        absent = sorted({(c, s) for c in COLOURS for s in SHAPES} - present)
        near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
        questions = [
            (min(present), "Yes", "adversarial,random"),
            (rng.choice(absent), "No", "random"),
            (rng.choice(near or absent), "No", "adversarial"),
        ]
        png = to_png(render(ex.scene))
        (out / "pope" / "images" / f"scene{k}.png").write_bytes(png)
        for j, ((colour, shape), answer, category) in enumerate(questions):
            index = str(100 * k + j)
            question = f"Is there a {colour} {shape} in the image?"
            rows.append(
                {
                    "index": index,
                    "image": base64.b64encode(png).decode() if j == 0 else str(100 * k),
                    "question": question,
                    "answer": answer,
                    "category": category,
                }
            )
            gold[index] = (answer.lower(), category.split(","))
            for cat in category.split(","):
                jsonl[cat].append(
                    {"question_id": int(index), "image": f"images/scene{k}.png", "text": question, "label": answer.lower()}
                )
    _write_tsv(sets.pope_tsv, ["index", "image", "question", "answer", "category"], rows)
    sets.gold["pope_tsv"] = gold
    for cat, records in jsonl.items():
        path = out / "pope" / f"synthetic_pope_{cat}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        sets.pope_jsonl.append(path)
        sets.gold[path.stem] = {str(r["question_id"]): (r["label"], [path.stem]) for r in records}
    return sets


def _b64(image) -> str:
    return base64.b64encode(to_png(image)).decode()


def _write_tsv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
