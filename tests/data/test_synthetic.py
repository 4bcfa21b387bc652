"""Synthetic task: pixels match scenes, answers match scenes, determinism, split disjointness, balance."""

import collections
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from vlsi_ray.data import synthetic as syn
from vlsi_ray.data.synthetic import Obj, Scene

# Written out here, not imported, so a change to the generator's option order fails these tests.
COLOUR_OPTS = ["red", "green", "blue", "yellow"]
SHAPE_OPTS = ["circle", "square", "triangle", "star"]
POSITION_OPTS = ["left", "right", "above", "below"]


def pixels(img):
    return np.asarray(img)


def test_options_are_fixed_constants():
    assert syn.LETTERS == "ABCD"
    assert syn.OPTIONS == {
        "colour": COLOUR_OPTS,
        "shape": SHAPE_OPTS,
        "count": ["1", "2", "3", "4"],
        "position": POSITION_OPTS,
        "pattern": SHAPE_OPTS,
    }
    assert syn.SCORED_TASKS == ("colour", "shape", "count", "position", "pattern")
    assert syn.ALL_TASKS == syn.SCORED_TASKS + ("caption",)


@pytest.mark.parametrize("image_size,grid", [(112, 4), (168, 6)])
def test_render_centre_pixels_and_empty_cells(image_size, grid):
    objs = [
        Obj(shape, colour, r, c, dot=(r + c) % 2 == 0)
        for (r, c), (shape, colour) in zip(
            [(0, 0), (0, 1), (1, 2), (2, 3), (3, 0), (3, 3), (1, 0), (2, 1)],
            [(s, col) for s in syn.SHAPES for col in syn.COLOURS][::3],
        )
    ]
    scene = Scene(tuple(objs))
    img = syn.render(scene, image_size, grid)
    assert img.mode == "RGB" and img.size == (image_size, image_size)
    px = pixels(img)
    cell = image_size // grid
    for o in objs:
        x, y = syn.cell_centre(o.row, o.col, image_size, grid)
        want = syn.DOT_COLOUR if o.dot else syn.COLOURS[o.colour]
        assert tuple(px[y, x]) == want, o
        # a few pixels off-centre (outside the dot) show the object's own colour
        assert tuple(px[y, x + cell // 5]) == syn.COLOURS[o.colour], o
        # shapes stay inside their cell: its corners are background
        assert tuple(px[o.row * cell, o.col * cell]) == syn.BACKGROUND
        assert tuple(px[o.row * cell + cell - 1, o.col * cell + cell - 1]) == syn.BACKGROUND
    occupied = {(o.row, o.col) for o in objs}
    for r in range(grid):
        for c in range(grid):
            if (r, c) not in occupied:
                block = px[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
                assert (block == syn.BACKGROUND).all()


def test_shapes_are_large_and_distinct():
    masks = {}
    for shape in syn.SHAPES:
        px = pixels(syn.render(Scene((Obj(shape, "red", 0, 0),)), 112, 4))[:28, :28]
        masks[shape] = (px == syn.COLOURS["red"]).all(axis=-1)
        ys, xs = np.nonzero(masks[shape])
        assert xs.max() - xs.min() + 1 >= 19 and ys.max() - ys.min() + 1 >= 19, shape  # ~22 px
    for a in syn.SHAPES:
        for b in syn.SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 30, (a, b)


def test_marker_is_drawn_in_its_own_colour():
    px = pixels(syn.render(Scene((Obj("star", "blue", 0, 0),), marker=(0, 3))))
    block = px[0:28, 84:112].reshape(-1, 3)
    colours = {tuple(p) for p in block}
    assert colours == {syn.BACKGROUND, syn.MARKER_COLOUR}
    assert sum(tuple(p) == syn.MARKER_COLOUR for p in block) > 40


@pytest.mark.parametrize(
    "scene,match",
    [
        (Scene((Obj("circle", "red", 4, 0),)), "outside"),
        (Scene((Obj("circle", "red", 1, 1), Obj("star", "blue", 1, 1))), "share a cell"),
        (Scene((Obj("hexagon", "red", 1, 1),)), "unknown shape"),
    ],
)
def test_render_rejects_bad_scenes(scene, match):
    with pytest.raises(ValueError, match=match):
        syn.render(scene)


def test_same_seed_same_bytes_different_seed_different():
    kw = dict(tasks=syn.ALL_TASKS)
    a = syn.generate_rows("train", 60, seed=3, **kw)
    b = syn.generate_rows("train", 60, seed=3, **kw)
    c = syn.generate_rows("train", 60, seed=4, **kw)
    assert a == b
    assert [r["id"] for r in a] == [f"train-{i:06d}" for i in range(60)]
    assert sum(x["images"] != y["images"] for x, y in zip(a, c)) >= 55
    assert (
        set(a[0]) == {"id", "images", "messages", "answer", "task", "source", "split", "tokens"} and a[0]["source"] == "synthetic"
    )
    assert all(r["images"][0].startswith(b"\x89PNG") and r["split"] == "train" for r in a)
    # Fewer rows are a prefix of more (the data-limited ablation's subset of the same split).
    assert syn.generate_rows("train", 25, seed=3, **kw) == a[:25]


def test_splits_are_disjoint_even_in_a_tiny_scene_space():
    # one object per scene: only 5 shapes x 4 colours x 16 cells x 2 dots = 640 possible images,
    # so independent streams alone would certainly collide.
    kw = dict(tasks=["colour"], distractors=False)
    images = {
        s: {r["images"][0] for r in syn.generate_rows(s, n, 0, **kw)} for s, n in [("train", 300), ("val", 60), ("test", 60)]
    }
    ids = {s: {r["id"] for r in syn.generate_rows(s, 5, 0, **kw)} for s in images}
    for a in images:
        for b in images:
            if a < b:
                assert not images[a] & images[b], (a, b)
                assert not ids[a] & ids[b], (a, b)


def _find(scene, colour=None, shape=None):
    return [o for o in scene.objects if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]


def derive_answer(ex):
    """Re-derive the correct option from the scene and question text alone."""
    s, q = ex.scene, ex.question
    if ex.task == "colour":
        (obj,) = _find(s, shape=re.fullmatch(r"What colour is the (\w+)\?", q)[1])
        return COLOUR_OPTS.index(obj.colour)
    if ex.task == "shape":
        (obj,) = _find(s, colour=re.fullmatch(r"What shape is the (\w+) object\?", q)[1])
        return SHAPE_OPTS.index(obj.shape)
    if ex.task == "count":
        return len(_find(s, shape=re.fullmatch(r"How many (\w+)s are there\?", q)[1])) - 1
    if ex.task == "position":
        m = re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", q)
        (a,) = _find(s, m[1], m[2])
        (b,) = _find(s, m[3], m[4])
        assert (a.row == b.row) != (a.col == b.col)
        if a.row == b.row:
            return POSITION_OPTS.index("left" if a.col < b.col else "right")
        return POSITION_OPTS.index("above" if a.row < b.row else "below")
    if ex.task == "pattern":
        r, c = s.marker
        row = sorted((o for o in s.objects if o.row == r), key=lambda o: o.col)
        seq = [o.shape for o in row]
        assert [o.col for o in row] == list(range(c)) and len({o.colour for o in row}) == 1
        period = next(p for p in range(1, len(seq) + 1) if all(seq[i] == seq[i % p] for i in range(len(seq))))
        return SHAPE_OPTS.index(seq[len(seq) % period])
    raise AssertionError(ex.task)


@pytest.mark.parametrize("grid", [4, 6])
def test_answers_match_the_scene(grid):
    exs = syn.generate_examples("train", 600, seed=11, tasks=syn.ALL_TASKS, grid=grid)
    seen = collections.Counter()
    for ex in exs:
        seen[ex.task] += 1
        if ex.task == "caption":
            described = set(re.findall(r"(\w+) (\w+) at row (\d+) column (\d+)( with a dot)?\.", ex.answer))
            assert described == {
                (o.colour, o.shape, str(o.row + 1), str(o.col + 1), " with a dot" if o.dot else "") for o in ex.scene.objects
            }
            assert len(described) == len(ex.scene.objects)
            continue
        assert ex.answer == "ABCD"[derive_answer(ex)], ex
        if ex.task == "shape":
            assert _find(ex.scene, colour=re.search(r"the (\w+) object", ex.question)[1])[0].shape != "diamond"
    assert set(seen) == set(syn.ALL_TASKS)


def test_rows_render_their_scene_and_use_the_chat_format():
    exs = syn.generate_examples("val", 24, seed=5, tasks=syn.ALL_TASKS)
    rows = syn.generate_rows("val", 24, seed=5, tasks=syn.ALL_TASKS)
    for ex, row in zip(exs, rows):
        img = Image.open(io.BytesIO(row["images"][0]))
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (112, 112)
        assert np.array_equal(pixels(img), pixels(syn.render(ex.scene)))
        msgs = json.loads(row["messages"])
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert msgs[0]["content"][0] == {"type": "image"}
        user = msgs[0]["content"][1]["text"]
        assert msgs[1]["content"] == [{"type": "text", "text": row["answer"]}]
        assert (row["id"], row["task"], row["answer"]) == (ex.id, ex.task, ex.answer)
        if row["task"] == "caption":
            assert user == "Describe the image."
        else:
            lines = user.split("\n")
            assert lines[0] == ex.question and lines[-1] == "Answer with the option's letter."
            assert lines[1:5] == [f"{letter}. {o}" for letter, o in zip("ABCD", syn.OPTIONS[row["task"]])]
            assert row["answer"] in "ABCD" and len(row["answer"]) == 1


def test_explained_responses_describe_the_image_after_the_scored_letter():
    """``explain``: the same scenes, questions and letters; the response goes on with the scene's description
    (every object's colour, shape, cell and dot, in reading order), and the instruction asks for it."""
    kw = dict(tasks=syn.ALL_TASKS, min_objects=2, max_objects=3)
    plain = syn.generate_rows("val", 24, seed=5, **kw)
    explained = syn.generate_rows("val", 24, seed=5, explain=True, **kw)
    for ex, row, base in zip(syn.generate_examples("val", 24, seed=5, explain=True, **kw), explained, plain):
        assert (row["images"], row["answer"], row["task"]) == (base["images"], base["answer"], base["task"])
        user, response = (json.loads(row["messages"])[i]["content"][-1]["text"] for i in (0, 1))
        if row["task"] == "caption":
            assert row["messages"] == base["messages"]
            continue
        assert user.split("\n")[-1] == "Answer with the option's letter, then describe the image."
        dot = {True: " with a dot", False: ""}
        cells = [f"{o.colour} {o.shape} at row {o.row + 1} column {o.col + 1}{dot[o.dot]}." for o in ex.scene.objects]
        assert response == f"{row['answer']}. " + " ".join(cells)
    colour = next(r for r in explained if r["task"] == "colour")
    assert json.loads(colour["messages"])[1]["content"][0]["text"].startswith(colour["answer"] + ". ")


def test_tasks_round_robin_and_letters_balanced():
    exs = syn.generate_examples("train", 400, seed=0)
    tasks = [e.task for e in exs]
    assert tasks[:10] == list(syn.SCORED_TASKS) * 2
    counts = collections.Counter(tasks)
    assert counts == {t: 80 for t in syn.SCORED_TASKS}
    for task in syn.SCORED_TASKS:
        letters = collections.Counter(e.answer for e in exs if e.task == task)
        assert letters == {letter: 20 for letter in "ABCD"}, task
        # not a fixed cycle: the letter order differs between blocks of four
        seq = "".join(e.answer for e in exs if e.task == task)
        assert len({seq[i : i + 4] for i in range(0, 80, 4)}) > 3


def test_caption_fraction_and_weights():
    exs = syn.generate_examples("train", 500, seed=1, caption_fraction=0.3)
    counts = collections.Counter(e.task for e in exs)
    assert counts["caption"] == 150
    assert all(abs(counts[t] - 70) <= 1 for t in syn.SCORED_TASKS)
    w = syn.task_weights({"colour": 3, "count": 1})
    assert collections.Counter(syn.task_schedule(w, 40)) == {"colour": 30, "count": 10}
    assert syn.task_weights(syn.ALL_TASKS, caption_fraction=0.0) == {t: 0.2 for t in syn.SCORED_TASKS}


def test_difficulty_knobs():
    exs = syn.generate_examples("train", 200, seed=2, tasks=syn.ALL_TASKS, min_objects=3, max_objects=4, dot_prob=0.0)
    for e in exs:
        assert 3 <= len(e.scene.objects) <= 4, e
        assert not any(o.dot for o in e.scene.objects)
    bare = syn.generate_examples("train", 100, seed=2, distractors=False, dot_prob=1.0)
    need = {"colour": 1, "shape": 1, "position": 2, "pattern": 3}
    for e in bare:
        want = need.get(e.task) or "ABCD".index(e.answer) + 1
        assert len(e.scene.objects) == want, e
        assert all(o.dot for o in e.scene.objects) or e.task == "pattern"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(min_objects=5, max_objects=2), "min_objects"),
        (dict(dot_prob=1.5), "dot_prob"),
        (dict(tasks=["juggling"]), "unknown task"),
        (dict(caption_fraction=1.0), "caption_fraction"),
        (dict(image_size=100, grid=3), "image_size"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        syn.generate_rows("train", 4, 0, **kwargs)


def test_pattern_periods_drop_ambiguous_ones():
    assert syn.pattern_periods(3) == ["AB", "AAB", "ABB", "ABC"]
    assert syn.pattern_periods(5) == ["AB", "AAB", "ABB", "ABC", "AABB"]


def test_corpus_texts():
    rows = syn.generate_rows("train", 12, 0, tasks=syn.ALL_TASKS)
    texts = syn.corpus_texts(rows)
    assert len(texts) == 24
    assert texts[1::2] == [r["answer"] for r in rows]
    assert any("A. red" in t for t in texts) and "Describe the image." in texts
