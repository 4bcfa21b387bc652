"""The Ray Data train stream is the in-process batch order, whichever way an epoch is sorted."""

from __future__ import annotations

import itertools

import pytest

from vlsi_ray.data.ray_dataset import train_dataset, train_split
from vlsi_ray.data.shards import read_rows, write_shards
from vlsi_ray.data.synthetic import generate_rows
from vlsi_ray.method.loop import BatchOrder
from vlsi_ray.runners.ray.driver import _data_context

BATCH = 8
TASKS = ("shape", "colour")


@pytest.mark.integration
@pytest.mark.parametrize("sort_in_memory_mb", [512, 0], ids=["one-task sort", "distributed sort"])
def test_train_stream_is_the_in_process_order(local_ray, tmp_path, sort_in_memory_mb):
    """Three epochs of two tasks' rows: the ids arrive exactly as BatchOrder hands them out in process."""
    write_shards(generate_rows("train", 120, seed=3), tmp_path, "train", rows_per_shard=40)
    rows = [r for r in read_rows(tmp_path, "train")[0] if r["task"] in TASKS]
    batches = 3 * (len(rows) // BATCH) + 2  # into a fourth epoch

    _data_context()
    split = train_split(tmp_path, "skip", sort_in_memory_mb)
    assert split.in_memory == (sort_in_memory_mb > 0) and split.num_files == 3
    stream = train_dataset(split, TASKS, seed=11, global_batch=BATCH, total_batches=batches, ids=[r["id"] for r in rows])
    got = [list(b["id"]) for b in itertools.islice(stream.iter_batches(batch_size=BATCH, batch_format="numpy"), batches)]

    order = BatchOrder([r["id"] for r in rows], BATCH, seed=11)
    expected = [[rows[i]["id"] for i in indices] for indices in itertools.islice(iter(order), batches)]
    assert got == expected
