"""Parquet shards: round trip, cached generation, row validation and corrupt-row handling."""

import json
import logging

import pyarrow.parquet as pq
import pytest

from vlsi_ray.data import shards
from vlsi_ray.data.shards import CorruptRowError, read_rows, validate_row, write_shards
from vlsi_ray.data.synthetic import ALL_TASKS, generate_rows


@pytest.fixture(scope="module")
def rows():
    return generate_rows("train", 25, seed=0, tasks=ALL_TASKS)


def test_round_trip(tmp_path, rows):
    paths = write_shards(rows, tmp_path, "train", rows_per_shard=10)
    assert [p.name for p in paths] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert [pq.read_metadata(p).num_rows for p in paths] == [10, 10, 5]
    assert pq.read_schema(paths[0]).names == ["id", "images", "messages", "answer", "task", "source", "split", "tokens"]
    back, stats = read_rows(tmp_path, "train")
    assert back == rows
    assert (stats.read, stats.kept, stats.skipped, stats.skipped_ids) == (25, 25, 0, [])
    back2, _ = read_rows([str(p) for p in paths])  # a list of files works too
    assert back2 == rows
    wanted = {rows[3]["id"], rows[17]["id"], "not-there"}  # filtered as each shard is read, in shard order
    some, stats = read_rows(tmp_path, "train", ids=wanted)
    assert some == [rows[3], rows[17]] and stats.read == 2


def test_rewrite_removes_stale_shards(tmp_path, rows):
    write_shards(rows, tmp_path, "train", rows_per_shard=5)
    write_shards(rows[:7], tmp_path, "train", rows_per_shard=5)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["train-00000.parquet", "train-00001.parquet"]
    assert read_rows(tmp_path, "train")[0] == rows[:7]


def test_generate_dataset_is_cached(tmp_path, capsys):
    kw = dict(sizes={"train": 20, "val": 8}, seed=7, rows_per_shard=8, caption_fraction=0.25)
    m1 = shards.generate_dataset(tmp_path, **kw)
    assert m1["splits"] == {
        "train": {"files": ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"], "rows": 20},
        "val": {"files": ["val-00000.parquet"], "rows": 8},
    }
    assert m1["generator_kwargs"] == {"caption_fraction": 0.25} and m1["seed"] == 7
    assert json.loads((tmp_path / "manifest.json").read_text()) == m1
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    capsys.readouterr()
    m2 = shards.generate_dataset(tmp_path, **kw)
    assert m2 == m1
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    assert "reusing" in capsys.readouterr().out
    train, _ = read_rows(tmp_path, "train")
    assert train == generate_rows("train", 20, 7, caption_fraction=0.25)
    # different parameters, or a missing file, regenerate
    (tmp_path / "val-00000.parquet").unlink()
    shards.generate_dataset(tmp_path, **kw)
    assert (tmp_path / "val-00000.parquet").exists()
    m3 = shards.generate_dataset(tmp_path, **{**kw, "seed": 8, "sizes": {"train": 20}})
    assert m3["seed"] == 8 and set(m3["splits"]) == {"train"}
    assert not (tmp_path / "val-00000.parquet").exists()
    assert read_rows(tmp_path, "train")[0] != train


def corrupt(rows):
    """Good rows plus one row per kind of damage, keyed by the damaged row's id."""
    good = [dict(r) for r in rows[:6]]
    user_only = json.dumps([json.loads(rows[9]["messages"])[0]])
    bad = {
        "truncated-png": dict(rows[6], images=[rows[6]["images"][0][: len(rows[6]["images"][0]) // 2]]),
        "not-an-image": dict(rows[7], images=[b"definitely not a png"]),
        "bad-json": dict(rows[8], messages="[{not json"),
        "no-assistant": dict(rows[9], messages=user_only),
        "two-images-one-part": dict(rows[10], images=rows[10]["images"] * 2),
    }
    for rid, r in bad.items():
        r["id"] = rid
    return good, bad


def test_corrupt_rows_are_skipped_and_counted(tmp_path, rows, caplog):
    good, bad = corrupt(rows)
    mixed = good[:3] + list(bad.values()) + good[3:]
    write_shards(mixed, tmp_path, "train", rows_per_shard=6)
    with caplog.at_level(logging.WARNING, logger="vlsi_ray.data.shards"):
        kept, stats = read_rows(tmp_path, "train", on_error="skip")
    assert kept == good
    assert (stats.read, stats.kept, stats.skipped) == (11, 6, 5)
    assert stats.skipped_ids == list(bad)
    assert stats.reasons["truncated-png"].startswith("image does not decode")
    assert stats.reasons["not-an-image"].startswith("image does not decode")
    assert stats.reasons["bad-json"] == "messages is not valid JSON"
    assert stats.reasons["no-assistant"] == "messages has no assistant turn with text to learn from"
    assert stats.reasons["two-images-one-part"] == "messages have 1 image parts but the row has 2 images"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5
    assert all("train-0000" in w for w in warnings)  # names the shard file
    assert all(any(rid in w for w in warnings) for rid in bad)


def test_one_schema_takes_text_only_multi_image_and_multi_turn_rows(tmp_path, rows):
    """Rows of any source: no image, several images, a system turn and three exchanges, a free-form task
    and source, no scorable answer: all valid and read back as written."""
    png = rows[0]["images"][0]
    text_only = {
        "id": "math-1",
        "images": [],
        "task": "math",
        "source": "mathinstruct",
        "split": "train",
        "answer": None,
        "tokens": None,
        "messages": json.dumps([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]),
    }
    two_images = dict(
        text_only,
        id="pair-1",
        task="compare",
        source="sharegpt4v",
        images=[png, rows[1]["images"][0]],
        messages=json.dumps(
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
            ]
        ),
    )
    three_turns = dict(
        text_only,
        id="chat-1",
        task="chat",
        source="allava",
        images=[png],
        messages=json.dumps(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A circle."},
                {"role": "user", "content": "Colour?"},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "Size?"},
                {"role": "assistant", "content": "Small."},
            ]
        ),
    )
    for row in (text_only, two_images, three_turns):
        assert shards.validate_row(row) is None, row["id"]
    late_system = dict(
        three_turns,
        id="late",
        messages=json.dumps(json.loads(three_turns["messages"])[1:3] + [{"role": "system", "content": "x"}]),
    )
    assert shards.validate_row(late_system) == "turn 2 has role 'system'; use system (first only), user or assistant"
    write_shards([text_only, two_images, three_turns], tmp_path, "train")
    kept, stats = read_rows(tmp_path, "train")
    assert kept == [text_only, two_images, three_turns] and stats.skipped == 0


def test_corrupt_row_raises_naming_file_and_id(tmp_path, rows):
    good, bad = corrupt(rows)
    write_shards(good[:2] + [bad["bad-json"]], tmp_path, "val")
    with pytest.raises(CorruptRowError) as err:
        read_rows(tmp_path, "val", on_error="raise")
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "val-00000.parquet" in msg and "'bad-json'" in msg and "messages is not valid JSON" in msg
    assert "data.on_error=skip" in msg


_TEXT_ONLY = [
    {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
]


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda r: r.pop("source"), "missing field 'source'"),
        (lambda r: r.update(id=""), "empty id"),
        (lambda r: r.update(task=" "), "empty task"),
        (lambda r: r.update(images="png as text"), "field 'images' is str, expected list"),
        (lambda r: r.update(messages=json.dumps(_TEXT_ONLY)), "messages have 0 image parts but the row has 1 images"),
        (
            lambda r: r.update(
                messages=json.dumps(
                    [
                        {"role": "user", "content": [{"type": "image"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": " "}]},
                    ]
                )
            ),
            "messages has no assistant turn with text to learn from",
        ),
        (
            lambda r: r.update(messages=json.dumps([{"role": "robot", "content": "hi"}])),
            "turn 0 has role 'robot'; use system (first only), user or assistant",
        ),
        (
            lambda r: r.update(messages=json.dumps([{"role": "user", "content": 3}])),
            "turn 0's content is neither a string nor a list of typed parts",
        ),
        (lambda r: r.update(messages="{}"), "messages is not a non-empty list of turns"),
    ],
)
def test_validate_row_reasons(rows, change, reason):
    row = dict(rows[0])
    assert validate_row(row) is None
    change(row)
    assert validate_row(row) == reason


def test_missing_data_errors_say_how_to_generate(tmp_path, rows):
    with pytest.raises(FileNotFoundError, match="does not exist.*generate_dataset"):
        read_rows(tmp_path / "nope")
    write_shards(rows[:3], tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="No 'test' shards.*generate_dataset"):
        read_rows(tmp_path, "test")
    with pytest.raises(ValueError, match="on_error"):
        read_rows(tmp_path, "train", on_error="ignore")


def test_decode_image(rows):
    img = shards.decode_image(rows[0]["images"][0])
    assert img.mode == "RGB" and img.size == (112, 112)
    assert img.getpixel((0, 0)) == (250, 250, 250)
