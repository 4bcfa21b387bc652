"""The Ray Data train stream is the in-process batch order, whichever way an epoch is sorted, length-grouped or not."""

from __future__ import annotations

import itertools

import pytest

from vlsi_ray.data.order import BatchOrder
from vlsi_ray.data.ray_dataset import train_dataset, train_split
from vlsi_ray.data.shards import read_rows, write_shards
from vlsi_ray.data.synthetic import generate_rows
from vlsi_ray.runners.ray.driver import _data_context

BATCH = 8
TASKS = ("shape", "colour")
#: Rows per length group (two global batches): with ~50 rows of the two tasks, a few groups per epoch.
GROUP_ROWS = 2 * BATCH


@pytest.mark.integration
@pytest.mark.parametrize("sort_in_memory_mb", [512, 0], ids=["one-task sort", "distributed sort"])
@pytest.mark.parametrize(
    "grouped", [None, "shards", "sent"], ids=["shuffled", "grouped (shard lengths)", "grouped (sent lengths)"]
)
def test_train_stream_is_the_in_process_order(local_ray, tmp_path, sort_in_memory_mb, grouped):
    """Three epochs of two tasks' rows: the ids arrive exactly as BatchOrder hands them out in process.
    Length-grouped, the lengths come from the shards' ``tokens`` column or are sent with the stage."""
    rows = [dict(r, tokens=40 + (i * 37) % 61) for i, r in enumerate(generate_rows("train", 120, seed=3))]
    write_shards(rows, tmp_path, "train", rows_per_shard=40)
    rows = [r for r in read_rows(tmp_path, "train")[0] if r["task"] in TASKS]
    ids = [r["id"] for r in rows]
    lengths = [r["tokens"] if grouped != "sent" else 300 - r["tokens"] for r in rows]  # sent: not the shards' counts
    batches = 3 * (len(rows) // BATCH) + 2  # into a fourth epoch

    _data_context()
    split = train_split(tmp_path, set(), sort_in_memory_mb)
    assert split.in_memory == (sort_in_memory_mb > 0) and split.num_files == 3
    grouping = (
        {} if grouped is None else {"lengths": lengths, "group_rows": GROUP_ROWS, "lengths_from_shards": grouped == "shards"}
    )
    stream = train_dataset(split, TASKS, seed=11, global_batch=BATCH, total_batches=batches, ids=ids, **grouping)
    got = [list(b["id"]) for b in itertools.islice(stream.iter_batches(batch_size=BATCH, batch_format="numpy"), batches)]

    order = BatchOrder(ids, BATCH, seed=11, lengths=lengths if grouped else None, group_rows=GROUP_ROWS if grouped else 0)
    expected = [[rows[i]["id"] for i in indices] for indices in itertools.islice(iter(order), batches)]
    assert got == expected
    if grouped:  # within a group, longest first: most batches are in descending length
        by_id = dict(zip(ids, lengths))
        descending = sum(all(by_id[a] >= by_id[b] for a, b in itertools.pairwise(batch)) for batch in got)
        assert descending >= len(got) // 2
