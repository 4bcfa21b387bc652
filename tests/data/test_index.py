"""The run's data index: every split's row metadata without images or conversations, with bad and over-long rows
left out (skipped and counted, or refused) before any training; the Ray Data stream drops exactly those rows."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from data.test_shards import corrupt

from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.data.index import META, measure_in_process, measure_rows, needs_measuring, read_index
from vlsi_ray.data.ray_dataset import EpochRows, KnownRows
from vlsi_ray.data.shards import CorruptRowError, read_rows, write_shards
from vlsi_ray.data.synthetic import ALL_TASKS, corpus_texts, generate_rows
from vlsi_ray.models.qwen2_vl import build_image_processor
from vlsi_ray.models.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def rows():
    return generate_rows("train", 25, seed=0, tasks=ALL_TASKS)


@pytest.fixture(scope="module")
def collator(rows):
    return ChatCollator(train_tokenizer(corpus_texts(rows), "qwen2_vl"), build_image_processor(), "qwen2_vl")


def measure(collator):
    return lambda files: measure_in_process(files, collator)


def test_index_holds_metadata_and_measured_lengths(tmp_path, rows, collator):
    write_shards(rows, tmp_path, "train", rows_per_shard=10)
    index = read_index(tmp_path, "train", max_length=None, on_error="skip", measure=measure(collator))
    assert index.table.column_names == list(META) and len(index) == 25 and index.stats.skipped == 0
    assert index.ids() == [r["id"] for r in rows] and index.column("task") == [r["task"] for r in rows]
    assert index.column("tokens") == [len(collator.encode(r)[0]) for r in rows]
    assert index.ids(["colour"]) == [r["id"] for r in rows if r["task"] == "colour"]


def test_bad_rows_are_left_out_as_the_reader_leaves_them_out(tmp_path, rows, collator):
    good, bad = corrupt(rows)
    write_shards(good[:3] + list(bad.values()) + good[3:], tmp_path, "train", rows_per_shard=20)
    index = read_index(tmp_path, "train", max_length=None, on_error="skip", measure=measure(collator))
    kept, stats = read_rows(tmp_path, "train")
    assert index.ids() == [r["id"] for r in kept] and index.excluded() == set(bad) == set(stats.skipped_ids)
    assert index.stats.reasons["no-assistant"] == stats.reasons["no-assistant"]
    table = pq.read_table(tmp_path / "train-00000.parquet")
    streamed = KnownRows(index.excluded())(table)  # what the Ray Data train stream keeps
    assert streamed.column("id").to_pylist() == index.ids() and streamed.schema == table.schema
    tasks = {good[0]["task"]}  # a stage's tasks are picked when its epochs are laid out
    assert set(EpochRows(0, [(0, 0, 2**63 - 1)], 1, sorted(tasks))(streamed).column("task").to_pylist()) == tasks
    with pytest.raises(CorruptRowError, match="train row 'truncated-png' cannot train .*set data.on_error=skip"):
        read_index(tmp_path, "train", max_length=None, on_error="raise", measure=measure(collator))


def test_rows_over_max_length_are_bad_rows_before_training(tmp_path, rows, collator):
    write_shards(rows, tmp_path, "train")
    lengths = {r["id"]: len(collator.encode(r)[0]) for r in rows}
    cut = sorted(lengths.values())[len(lengths) // 2]
    index = read_index(tmp_path, "train", max_length=cut, on_error="skip", measure=measure(collator))
    assert index.excluded() == {i for i, n in lengths.items() if n > cut} != set()
    assert all(n <= cut for n in index.column("tokens"))
    assert index.stats.reasons[next(iter(index.excluded()))].startswith("over-long: ")
    with pytest.raises(CorruptRowError, match=r"over-long: \d+ tokens > data.max_length="):
        read_index(tmp_path, "train", max_length=cut, on_error="raise", measure=measure(collator))


def test_a_row_whose_template_leaves_no_response_is_bad(rows, collator):
    row = dict(rows[0], messages=json.dumps(json.loads(rows[0]["messages"])[:1] + [{"role": "assistant", "content": " "}]))
    (result,) = measure_rows([row], collator)
    assert result["tokens"] is None and "assistant turn with text" in result["problem"]


def test_shards_measured_by_prepare_data_are_trusted_only_for_the_same_processor(tmp_path, rows):
    write_shards([dict(r, tokens=7) for r in rows[:4]], tmp_path, "train")
    (tmp_path / "manifest.json").write_text(
        json.dumps({"kind": "prepared", "tokens_measured": True, "measured_with": "abc/None/None"})
    )
    assert not needs_measuring(tmp_path, "abc/None/None") and needs_measuring(tmp_path, "abc/3136/None")
    index = read_index(tmp_path, "train", max_length=6, on_error="skip")  # no measuring: the shards' counts
    assert len(index) == 0 and index.stats.skipped == 4
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "prepared", "tokens_measured": False}))
    assert needs_measuring(tmp_path, "abc/None/None")


def test_shards_of_an_older_schema_are_refused_with_the_fix(tmp_path, rows):
    write_shards(rows[:2], tmp_path, "train")
    table = pq.read_table(tmp_path / "train-00000.parquet").drop_columns(["tokens", "source"])
    pq.write_table(table, tmp_path / "train-00000.parquet")
    with pytest.raises(
        ValueError,
        match=r"train-00000.parquet lacks the row schema's column\(s\) source, tokens; convert the data again with jobs/prepare_data.py",
    ):
        read_index(tmp_path, "train", max_length=None, on_error="skip")
