"""The train split as a Ray Data pipeline: Parquet shards → the indexed rows → seeded epochs → workers.

The order is the one :class:`vlsi_ray.data.order.BatchOrder` gives in-process: epoch ``e`` sorts
the rows by :func:`order_keys` ``(id, seed, e)`` and keeps whole global batches. The epochs are
concatenated into one stream, so a Ray Train worker simply reads batches until the stage has its
steps, and a resumed worker skips the batches its checkpoint already consumed.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from vlsi_ray.data.order import epoch_sort_keys
from vlsi_ray.data.shards import shard_files

ORDER_COLUMN = "_order"
BUCKET_COLUMN = "_bucket"
GROUP_COLUMN = "_group"
LENGTH_COLUMN = "_negative_length"
SORT_COLUMNS = (BUCKET_COLUMN, GROUP_COLUMN, LENGTH_COLUMN, ORDER_COLUMN)


class KnownRows:
    """``map_batches`` function: drop the rows the run's index left out (``excluded`` ids: bad or over-long
    rows, see :mod:`vlsi_ray.data.index`), so that every stage streams exactly the rows it planned with.
    Each stage picks its tasks later (:class:`EpochRows`)."""

    def __init__(self, excluded: set[str]):
        self.excluded = excluded

    def __call__(self, table: pa.Table) -> pa.Table:
        if not self.excluded:
            return table
        return table.filter(pa.array([i not in self.excluded for i in table.column("id").to_pylist()], type=pa.bool_()))


@dataclass(frozen=True)
class Grouping:
    """Length-grouped epochs (:func:`~vlsi_ray.data.order.epoch_sort_keys`): ``rows`` the stage's row count,
    ``group_rows`` rows per group; ``lengths`` ``{id: tokens}`` when the run measured the rows itself (the
    shards' ``tokens`` column is then not its own), else None (the column is read)."""

    rows: int
    group_rows: int
    lengths: dict[str, int] | None = None


class EpochRows:
    """``map_batches`` function: every row of ``tasks`` (all when empty) once per epoch it trains in.

    Epoch ``e`` keeps the rows whose sort keys ``(group, -length, key)`` (:func:`epoch_sort_keys`;
    group and length are zero without ``grouping``) are at most ``cutoffs[e]`` (the whole batches of
    that epoch) and tags them with the sort columns: ``BUCKET_COLUMN`` = ``e × parts`` + the row's
    partition (its key's or, length-grouped, its group's range among ``parts``), then the three keys.
    Sorting by the four yields epoch 0 in training order, then epoch 1, ...; the buckets are the
    partitions of a distributed sort.
    """

    def __init__(self, seed: int, cutoffs: Sequence[tuple[int, int, int]], parts: int, tasks: Sequence[str] = (),
                 grouping: Grouping | None = None):  # fmt: skip
        self.seed, self.cutoffs, self.parts, self.tasks, self.grouping = seed, list(cutoffs), parts, set(tasks), grouping

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.tasks:
            table = table.filter(pa.array([t in self.tasks for t in table.column("task").to_pylist()], type=pa.bool_()))
        ids = table.column("id").to_pylist()
        grouping, lengths = self.grouping, None
        if grouping is not None:
            lengths = [grouping.lengths[i] for i in ids] if grouping.lengths is not None else table.column("tokens").to_pylist()
        epochs = []
        for epoch, (cut_group, cut_length, cut_key) in enumerate(self.cutoffs):
            groups, negative_lengths, keys = epoch_sort_keys(
                ids, self.seed, epoch, lengths, grouping.group_rows if grouping else 0, grouping.rows if grouping else None
            )
            keep = (groups < cut_group) | (groups == cut_group) & (
                (negative_lengths < cut_length) | (negative_lengths == cut_length) & (keys <= cut_key)
            )
            if grouping is not None:
                count = max(1, grouping.rows // grouping.group_rows)
                ranges = groups[keep] * self.parts // count
            elif self.parts > 1:
                ranges = keys[keep] // np.int64(-(-(2**63) // self.parts))
            else:
                ranges = np.zeros(int(keep.sum()), np.int64)
            epochs.append(
                table.filter(pa.array(keep))
                .append_column(BUCKET_COLUMN, pa.array(epoch * self.parts + ranges, type=pa.int64()))
                .append_column(GROUP_COLUMN, pa.array(groups[keep], type=pa.int64()))
                .append_column(LENGTH_COLUMN, pa.array(negative_lengths[keep], type=pa.int64()))
                .append_column(ORDER_COLUMN, pa.array(keys[keep], type=pa.int64()))
            )
        return pa.concat_tables(epochs)


@dataclass
class TrainSplit:
    """The usable train rows as a Ray Dataset, whether it is materialized, and its file count."""

    dataset: Any
    in_memory: bool
    num_files: int


def train_split(data_dir: str | Path, excluded: set[str], sort_in_memory_mb: float) -> TrainSplit:
    """The train split's usable rows (all but the ``excluded`` ids) as a Ray Dataset (read once per run;
    every stage orders it its own way). The rows were validated and measured by the run's index.

    When the split's Parquet shards total at most ``sort_in_memory_mb``, the validated rows are
    materialized in the object store and each stage sorts them in one task; larger splits stream
    from the files through Ray Data's distributed sort. Either way the order is the same.
    """
    files = [str(f) for f in shard_files(data_dir, "train")]
    in_memory = sum(os.path.getsize(f) for f in files) <= sort_in_memory_mb * 2**20
    with _footer_readers(files):
        dataset = ray.data.read_parquet(files).map_batches(KnownRows(excluded), batch_format="pyarrow")
    return TrainSplit(dataset.materialize() if in_memory else dataset, in_memory, len(files))


def train_dataset(
    split: TrainSplit,
    tasks: Sequence[str],
    seed: int,
    global_batch: int,
    total_batches: int,
    ids: Sequence[str],
    lengths: Sequence[int] | None = None,
    group_rows: int = 0,
    lengths_from_shards: bool = True,
):
    """One stage's Ray Dataset: the rows of ``tasks`` from :func:`train_split` in training order, long
    enough for ``total_batches``.

    ``global_batch`` rows (per-worker batch × workers) make one batch of every worker;
    ``total_batches`` counts global batches (optimizer steps × grad_accum); ``ids`` are the usable
    rows of ``tasks`` (from the run's index): from them the driver finds where each epoch's whole
    batches end. ``lengths`` (one per id) and ``group_rows``: length-grouped epochs, as in process
    (:func:`~vlsi_ray.data.order.epoch_order`); ``lengths_from_shards``: the workers read the rows'
    lengths from the shards' ``tokens`` column (prepared with the run's processor) instead of being
    sent them. All epochs are ordered by one sort on (epoch bucket, group, -length, key): in one task
    for an in-memory split, else as Ray Data's distributed sort with a partition per bucket (the keys
    are uniform, so fixed boundaries split each epoch evenly and no sampling pass is needed).
    """
    if len(ids) < global_batch:
        raise ValueError(
            f"the train split has {len(ids)} usable rows, fewer than one global batch of "
            f"{global_batch}; lower the stage's batch_size or train.num_workers."
        )
    grouping = None
    if lengths is not None and group_rows > 0:
        grouping = Grouping(len(ids), group_rows, None if lengths_from_shards else dict(zip(ids, lengths)))
    else:
        lengths = None
    used = (len(ids) // global_batch) * global_batch
    epochs = math.ceil(total_batches / (len(ids) // global_batch))
    cutoffs = []
    for epoch in range(epochs):
        keys = epoch_sort_keys(ids, seed, epoch, lengths, group_rows)
        last = np.lexsort(keys[::-1])[used - 1]
        cutoffs.append(tuple(int(k[last]) for k in keys))
    parts = 1 if split.in_memory else max(2, split.num_files)
    tagged = split.dataset.map_batches(EpochRows(seed, cutoffs, parts, tasks, grouping), batch_format="pyarrow")
    if split.in_memory:
        return tagged.repartition(1).map_batches(_sort_rows, batch_format="pyarrow", batch_size=None)
    return tagged.sort(list(SORT_COLUMNS), boundaries=list(range(1, epochs * parts)))


def _sort_rows(table: pa.Table) -> pa.Table:
    """``map_batches`` function over the whole (single-block) stream: rows in :data:`SORT_COLUMNS` order."""
    return table.sort_by([(column, "ascending") for column in SORT_COLUMNS])


#: Parquet files per footer-reading actor. Ray Data starts 32 such actors for every read by default:
#: 32 Python processes to read the footers of a handful of files.
FILES_PER_FOOTER_READER = 64
_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


@contextlib.contextmanager
def _footer_readers(files: Sequence[str]):
    """Size Ray Data's Parquet footer-reader pool to the number of files (unless the user set it);
    the reader reads the variable when ``read_parquet`` plans the read."""
    if _FOOTER_ACTORS_ENV in os.environ:
        yield
        return
    os.environ[_FOOTER_ACTORS_ENV] = str(min(32, max(1, math.ceil(len(files) / FILES_PER_FOOTER_READER))))
    try:
        yield
    finally:
        del os.environ[_FOOTER_ACTORS_ENV]


class RayCollate(NumpyBatchCollateFn):
    """Ray Data's collate hook around the one collate path (:class:`ChatCollator`)."""

    def __init__(self, collator):
        super().__init__()
        self.collator = collator

    def __call__(self, batch: dict) -> dict:
        """Columns ``{name: np.ndarray [B]}`` -> the collated model batch."""
        return self.collator(batch)
