"""Seeded synthetic visual task: coloured shapes on a token-aligned grid, with multiple-choice questions.

An image is a ``grid`` × ``grid`` board of equal cells (default 112 px, 4 × 4 cells of 28 px, so one
Qwen2-VL image token — 14 px patches merged 2 × 2 — sees exactly one cell). Each cell holds at most one
large shape, optionally with a dark dot in its centre. Questions use a FIXED option list per task
(shuffled options were not learnable at this scale, see SYNTHETIC_TASK_NOTES.md), answers are letters
balanced within each task, and task types are interleaved by weighted round-robin. With ``explain``
the response goes on after the letter with a description of the whole image ("B. red star at row 1
column 2. blue circle at row 3 column 1."): a response of many tokens, each one a decision about the
image, as instruction data's answers are; the row's ``answer`` (what is scored) stays the letter.

Everything is a function of ``(seed, split, arguments)``: the same call gives byte-identical rows.
Splits draw from different random streams and, for ``train``/``val``/``test``, from disjoint parts of
the scene space (a hash of the scene decides which split may use it), so no image is shared.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

GENERATOR_VERSION = 2  # bump whenever the rows for a given seed change (2: the schema with images, source, tokens)
#: The ``source`` of the synthetic task's rows.
SOURCE = "synthetic"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 150, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
BACKGROUND = (250, 250, 250)
DOT_COLOUR = (20, 20, 20)
MARKER_COLOUR = (100, 100, 100)  # the "?" of the pattern puzzle

LETTERS = "ABCD"
SCORED_TASKS = ("colour", "shape", "count", "position", "pattern")
ALL_TASKS = SCORED_TASKS + ("caption",)
OPTIONS: dict[str, list[str]] = {
    "colour": ["red", "green", "blue", "yellow"],
    "shape": ["circle", "square", "triangle", "star"],
    "count": ["1", "2", "3", "4"],
    "position": ["left", "right", "above", "below"],
    "pattern": ["circle", "square", "triangle", "star"],
}
INSTRUCTION = "Answer with the option's letter."
EXPLAIN_INSTRUCTION = "Answer with the option's letter, then describe the image."
CAPTION_PROMPT = "Describe the image."
# Periods of the pattern row; only those whose shortest-period continuation is unambiguous for the
# row length are used (e.g. "AABB" needs 5 shown cells, so it is dropped on a 4-wide grid).
PATTERN_PERIODS = ("AB", "AAB", "ABB", "ABC", "AABB")
# Share of the scene-hash space each known split may use, so their images never coincide.
SPLIT_RANGES = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}
_MAX_TRIES = 2000

assert all(len(v) == len(LETTERS) for v in OPTIONS.values())


@dataclass(frozen=True)
class Obj:
    """One shape in a cell (``row``, ``col`` are 0-based); ``dot`` puts a dark dot in its centre."""

    shape: str
    colour: str
    row: int
    col: int
    dot: bool = False


@dataclass(frozen=True)
class Scene:
    """The board: objects in reading order, plus the "?" cell of a pattern puzzle (or None)."""

    objects: tuple[Obj, ...]
    marker: tuple[int, int] | None = None

    def key(self) -> str:
        """A stable text form of the scene (what the image shows), used to partition splits."""
        return repr((self.objects, self.marker))


@dataclass(frozen=True)
class Difficulty:
    """Knobs for calibration: objects per scene, dot probability, and unrelated distractor objects."""

    min_objects: int = 2
    max_objects: int = 5
    dot_prob: float = 0.25
    distractors: bool = True  # False: only the objects the question needs

    def check(self, grid: int) -> None:
        """Raise a one-sentence ValueError naming the bad field and the fix."""
        if not 1 <= self.min_objects <= self.max_objects <= grid * grid:
            raise ValueError(
                f"min_objects={self.min_objects} and max_objects={self.max_objects} must satisfy "
                f"1 <= min_objects <= max_objects <= grid*grid={grid * grid}; adjust them."
            )
        if not 0.0 <= self.dot_prob <= 1.0:
            raise ValueError(f"dot_prob={self.dot_prob} must be in [0, 1]; adjust it.")


@dataclass(frozen=True)
class Example:
    """A generated question before rendering: ``answer`` is a letter (the caption for captions);
    ``explain``: the response describes the image after the letter."""

    id: str
    split: str
    task: str
    scene: Scene
    question: str
    answer: str
    explain: bool = False

    @property
    def user_text(self) -> str:
        """The user turn's text: question, fixed options one per line, instruction."""
        if self.task == "caption":
            return self.question
        lines = [f"{letter}. {opt}" for letter, opt in zip(LETTERS, OPTIONS[self.task])]
        return "\n".join([self.question, *lines, EXPLAIN_INSTRUCTION if self.explain else INSTRUCTION])

    @property
    def response(self) -> str:
        """The assistant turn's text: the answer, then (``explain``) the image's description."""
        if self.explain and self.task != "caption":
            return f"{self.answer}. {caption(self.scene)}"
        return self.answer


# ----------------------------------------------------------------------------------------- render
def _cell_px(image_size: int, grid: int) -> int:
    if grid < 1 or image_size % grid or image_size // grid < 8:
        raise ValueError(
            f"image_size={image_size} must be a multiple of grid={grid} with cells of "
            f"at least 8 px; use e.g. image_size=112 with grid=4."
        )
    return image_size // grid


def cell_centre(row: int, col: int, image_size: int = 112, grid: int = 4) -> tuple[int, int]:
    """Pixel (x, y) at the centre of cell (row, col)."""
    cell = _cell_px(image_size, grid)
    return col * cell + cell // 2, row * cell + cell // 2


def _check_scene(scene: Scene, grid: int) -> None:
    cells = [(o.row, o.col) for o in scene.objects] + ([scene.marker] if scene.marker else [])
    for r, c in cells:
        if not (0 <= r < grid and 0 <= c < grid):
            raise ValueError(f"cell ({r}, {c}) is outside the {grid}x{grid} grid; fix the scene.")
    if len(set(cells)) != len(cells):
        raise ValueError("two objects (or an object and the marker) share a cell; fix the scene.")
    for o in scene.objects:
        if o.shape not in SHAPES or o.colour not in COLOURS:
            raise ValueError(f"object {o} has an unknown shape or colour; use SHAPES and COLOURS.")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9  # a full-size square looks much bigger than the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}.")


def _draw_marker(draw: ImageDraw.ImageDraw, cx: float, cy: float, cell: int) -> None:
    s = cell / 28
    w = max(2, round(3 * s))
    draw.arc([cx - 6 * s, cy - 10 * s, cx + 6 * s, cy + 2 * s], start=180, end=90, fill=MARKER_COLOUR, width=w)
    draw.line([(cx, cy + 1 * s), (cx, cy + 5 * s)], fill=MARKER_COLOUR, width=w)
    draw.ellipse([cx - 2 * s, cy + 7 * s, cx + 2 * s, cy + 11 * s], fill=MARKER_COLOUR)


def render(scene: Scene, image_size: int = 112, grid: int = 4) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``image_size`` × ``image_size`` px on a ``grid`` × ``grid`` board."""
    cell = _cell_px(image_size, grid)
    _check_scene(scene, grid)
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    r = 0.4 * cell
    dot_r = max(1.0, cell / 10)
    for o in scene.objects:
        cx, cy = cell_centre(o.row, o.col, image_size, grid)
        _draw_shape(draw, o.shape, cx, cy, r, COLOURS[o.colour])
        if o.dot:
            draw.ellipse([cx - dot_r, cy - dot_r, cx + dot_r, cy + dot_r], fill=DOT_COLOUR)
    if scene.marker is not None:
        _draw_marker(draw, *cell_centre(*scene.marker, image_size, grid), cell)
    return img


def to_png(img: Image.Image) -> bytes:
    """PNG bytes with a fixed compress level, so the same image always gives the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def caption(scene: Scene) -> str:
    """Dense description, objects in reading order: 'red star at row 1 column 2 with a dot. ...'."""
    parts = []
    for o in sorted(scene.objects, key=lambda o: (o.row, o.col)):
        dot = " with a dot" if o.dot else ""
        parts.append(f"{o.colour} {o.shape} at row {o.row + 1} column {o.col + 1}{dot}.")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------- scenes
def _scene(objs: list[Obj], marker: tuple[int, int] | None = None) -> Scene:
    return Scene(tuple(sorted(objs, key=lambda o: (o.row, o.col))), marker)


def _n_objects(rng: random.Random, d: Difficulty, needed: int) -> int:
    if not d.distractors:
        return needed
    return max(needed, rng.randint(d.min_objects, d.max_objects))


def _cells(grid: int, exclude_row: int | None = None) -> list[tuple[int, int]]:
    return [(r, c) for r in range(grid) for c in range(grid) if r != exclude_row]


def _distractor(
    rng: random.Random,
    cell: tuple[int, int],
    d: Difficulty,
    shapes: Sequence[str],
    colours: Sequence[str],
    banned: set[tuple[str, str]] = frozenset(),
) -> Obj:
    while True:
        colour, shape = rng.choice(colours), rng.choice(shapes)
        if (colour, shape) not in banned:
            return Obj(shape, colour, *cell, dot=rng.random() < d.dot_prob)


def shortest_period_answer(seq: Sequence[str]) -> str:
    """Continue ``seq`` by its shortest period: the next item is ``seq[len - p]``."""
    m = len(seq)
    for p in range(1, m + 1):
        if all(seq[i] == seq[i - p] for i in range(p, m)):
            return seq[m - p]
    raise ValueError("empty sequence has no continuation; pass at least one item.")


def pattern_periods(shown: int) -> list[str]:
    """Periods of PATTERN_PERIODS whose first ``shown`` items determine the next one unambiguously."""
    out = []
    for period in PATTERN_PERIODS:
        seq = [period[i % len(period)] for i in range(shown + 1)]
        if len(set(seq[:shown])) == len(set(period)) and shortest_period_answer(seq[:shown]) == seq[-1]:
            out.append(period)
    return out


def _build(task: str, rng: random.Random, idx: int, grid: int, d: Difficulty) -> tuple[Scene, str]:
    """Sample a scene whose correct option is ``OPTIONS[task][idx]``; returns (scene, question)."""
    names = list(COLOURS)
    if task == "colour":
        colour, shape = OPTIONS["colour"][idx], rng.choice(SHAPES)
        cells = rng.sample(_cells(grid), _n_objects(rng, d, 1))
        objs = [Obj(shape, colour, *cells[0], dot=rng.random() < d.dot_prob)]
        others = [s for s in SHAPES if s != shape]
        objs += [_distractor(rng, c, d, others, names) for c in cells[1:]]
        return _scene(objs), f"What colour is the {shape}?"
    if task == "shape":
        shape, colour = OPTIONS["shape"][idx], rng.choice(names)
        cells = rng.sample(_cells(grid), _n_objects(rng, d, 1))
        objs = [Obj(shape, colour, *cells[0], dot=rng.random() < d.dot_prob)]
        others = [c for c in names if c != colour]
        objs += [_distractor(rng, c, d, SHAPES, others) for c in cells[1:]]
        return _scene(objs), f"What shape is the {colour} object?"
    if task == "count":
        k, shape = int(OPTIONS["count"][idx]), rng.choice(SHAPES)
        cells = rng.sample(_cells(grid), _n_objects(rng, d, k))
        objs = [Obj(shape, rng.choice(names), *c, dot=rng.random() < d.dot_prob) for c in cells[:k]]
        others = [s for s in SHAPES if s != shape]
        objs += [_distractor(rng, c, d, others, names) for c in cells[k:]]
        return _scene(objs), f"How many {shape}s are there?"
    if task == "position":
        rel = OPTIONS["position"][idx]
        a = (rng.choice(names), rng.choice(SHAPES))
        b = a
        while b == a:
            b = (rng.choice(names), rng.choice(SHAPES))
        line = rng.randrange(grid)
        lo, hi = sorted(rng.sample(range(grid), 2))
        first, second = (lo, hi) if rel in ("left", "above") else (hi, lo)
        if rel in ("left", "right"):
            cell_a, cell_b = (line, first), (line, second)
        else:
            cell_a, cell_b = (first, line), (second, line)
        objs = [Obj(a[1], a[0], *cell_a, dot=rng.random() < d.dot_prob), Obj(b[1], b[0], *cell_b, dot=rng.random() < d.dot_prob)]
        free = [c for c in _cells(grid) if c not in (cell_a, cell_b)]
        extra = rng.sample(free, _n_objects(rng, d, 2) - 2)
        objs += [_distractor(rng, c, d, SHAPES, names, {a, b}) for c in extra]
        q = f"Where is the {a[0]} {a[1]} relative to the {b[0]} {b[1]}?"
        return _scene(objs), q
    if task == "pattern":
        shown = grid - 1
        periods = pattern_periods(shown)
        if not periods:
            raise ValueError(f"grid={grid} is too small for the pattern task; use grid >= 4.")
        period = rng.choice(periods)
        seq = [period[i % len(period)] for i in range(shown + 1)]
        answer_shape = OPTIONS["pattern"][idx]
        symbols = sorted(set(period) - {seq[-1]})
        fill = rng.sample([s for s in SHAPES if s != answer_shape], len(symbols))
        to_shape = {seq[-1]: answer_shape, **dict(zip(symbols, fill))}
        row, colour = rng.randrange(grid), rng.choice(names)
        objs = [Obj(to_shape[sym], colour, row, col) for col, sym in enumerate(seq[:shown])]
        extra = rng.sample(_cells(grid, exclude_row=row), _n_objects(rng, d, shown) - shown)
        objs += [_distractor(rng, c, d, SHAPES, names) for c in extra]
        return _scene(objs, marker=(row, shown)), "Which shape completes the pattern?"
    if task == "caption":
        cells = rng.sample(_cells(grid), rng.randint(d.min_objects, d.max_objects))
        return _scene([_distractor(rng, c, d, SHAPES, names) for c in cells]), CAPTION_PROMPT
    raise ValueError(f"unknown task {task!r}; use one of {ALL_TASKS}.")


# ------------------------------------------------------------------------------------- generation
def _split_seed(seed: int, split: str) -> int:
    digest = hashlib.blake2b(f"vlsi-ray/{seed}/{split}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _scene_fraction(scene: Scene) -> float:
    digest = hashlib.blake2b(scene.key().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def task_weights(
    tasks: Sequence[str] | Mapping[str, float] | None = None, caption_fraction: float | None = None
) -> dict[str, float]:
    """Resolve the task mix: a list (equal weights) or {task: weight}; ``caption_fraction`` sets
    the caption share of all rows (0 removes captions). Default: the five scored tasks, equal."""
    if tasks is None:
        tasks = SCORED_TASKS
    weights = dict(tasks) if isinstance(tasks, Mapping) else {t: 1.0 for t in tasks}
    for t, w in weights.items():
        if t not in ALL_TASKS:
            raise ValueError(f"unknown task {t!r} in tasks; use names from {ALL_TASKS}.")
        if not w > 0:
            raise ValueError(f"task weight for {t!r} is {w}; weights must be positive.")
    if caption_fraction is not None:
        if not 0.0 <= caption_fraction < 1.0:
            raise ValueError(f"caption_fraction={caption_fraction} must be in [0, 1); adjust it.")
        weights.pop("caption", None)
        total = sum(weights.values())
        weights = {t: w * (1 - caption_fraction) / total for t, w in weights.items()}
        if caption_fraction > 0:
            weights["caption"] = caption_fraction
    if not weights:
        raise ValueError("tasks is empty; pass at least one task from ALL_TASKS.")
    return weights


def task_schedule(weights: Mapping[str, float], n: int) -> list[str]:
    """Smooth weighted round-robin: deterministic, interleaved, and within 1 of each task's share."""
    current = {t: 0.0 for t in weights}
    total = sum(weights.values())
    out = []
    for _ in range(n):
        for t, w in weights.items():
            current[t] += w
        pick = max(current, key=lambda t: current[t])  # ties go to the earlier task
        current[pick] -= total
        out.append(pick)
    return out


def generate_examples(
    split: str,
    n: int,
    seed: int,
    tasks: Sequence[str] | Mapping[str, float] | None = None,
    caption_fraction: float | None = None,
    grid: int = 4,
    explain: bool = False,
    **difficulty,
) -> list[Example]:
    """Generate ``n`` examples (scenes + questions, not yet rendered) for ``split``.

    ``difficulty`` holds ``Difficulty`` fields (min_objects, max_objects, dot_prob, distractors);
    ``explain`` makes every response the letter and a description of the image (the same scenes and
    questions as without it).
    """
    d = Difficulty(**difficulty)
    d.check(grid)
    if n < 0:
        raise ValueError(f"n={n} must be >= 0.")
    rng = random.Random(_split_seed(seed, split))
    lo, hi = SPLIT_RANGES.get(split, (0.0, 1.0))
    pending: dict[str, list[int]] = {}  # per task, the answer indices left in the current block
    out = []
    for i, task in enumerate(task_schedule(task_weights(tasks, caption_fraction), n)):
        if task != "caption" and not pending.get(task):
            pending[task] = rng.sample(range(len(LETTERS)), len(LETTERS))
        idx = pending[task].pop() if task != "caption" else -1
        for _ in range(_MAX_TRIES):
            scene, question = _build(task, rng, idx, grid, d)
            if lo <= _scene_fraction(scene) < hi:
                break
        else:
            raise RuntimeError(
                f"no {task!r} scene for split {split!r} in {_MAX_TRIES} tries; "
                f"allow more variety (raise max_objects or set distractors=True)."
            )
        answer = caption(scene) if task == "caption" else LETTERS[idx]
        out.append(Example(f"{split}-{i:06d}", split, task, scene, question, answer, explain))
    return out


def messages_json(user_text: str, answer: str) -> str:
    """The Hugging Face chat format: one user turn (image + text), one assistant turn (text)."""
    return json.dumps(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    )


def example_to_row(ex: Example, image_size: int = 112, grid: int = 4) -> dict:
    """Render one example into a row of the shard schema: id, images ([PNG bytes]), messages (JSON),
    answer, task, source, split."""
    return {
        "id": ex.id,
        "images": [to_png(render(ex.scene, image_size, grid))],
        "messages": messages_json(ex.user_text, ex.response),
        "answer": ex.answer,
        "task": ex.task,
        "source": SOURCE,
        "split": ex.split,
        "tokens": None,
    }


def generate_rows(
    split: str,
    n: int,
    seed: int,
    tasks: Sequence[str] | Mapping[str, float] | None = None,
    caption_fraction: float | None = None,
    image_size: int = 112,
    grid: int = 4,
    explain: bool = False,
    **difficulty,
) -> list[dict]:
    """Generate ``n`` rendered rows for ``split``; same arguments and seed give identical bytes."""
    _cell_px(image_size, grid)
    examples = generate_examples(split, n, seed, tasks, caption_fraction, grid, explain, **difficulty)
    return [example_to_row(ex, image_size, grid) for ex in examples]


def corpus_texts(rows: Sequence[Mapping]) -> list[str]:
    """All user and assistant texts of ``rows`` (e.g. to train a tokenizer)."""
    texts = []
    for row in rows:
        for turn in json.loads(row["messages"]):
            texts += [p["text"] for p in turn["content"] if p.get("type") == "text"]
    return texts
