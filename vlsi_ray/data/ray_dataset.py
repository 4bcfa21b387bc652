"""The train split as a Ray Data pipeline: Parquet shards → validated rows → seeded epochs → workers.

The order is the one :class:`vlsi_ray.method.loop.BatchOrder` gives in-process: epoch ``e`` sorts
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

from vlsi_ray.data.shards import SKIP_HINT, CorruptRowError, shard_files, validate_row
from vlsi_ray.method.loop import order_keys

ORDER_COLUMN = "_order"
BUCKET_COLUMN = "_bucket"


class ValidRows:
    """``map_batches`` function: keep the rows that :func:`validate_row` accepts.

    A corrupt row is dropped (``on_error="skip"``; the driver counts them when it reads the
    splits) or raises :class:`CorruptRowError` naming the row (``"raise"``). Each stage picks its
    tasks later (:class:`EpochRows`).
    """

    def __init__(self, on_error: str):
        self.on_error = on_error

    def __call__(self, table: pa.Table) -> pa.Table:
        keep = []
        for row in table.to_pylist():
            problem = validate_row(row)
            if problem is not None and self.on_error == "raise":
                raise CorruptRowError(f"Row {row.get('id')!r} is corrupt ({problem}); {SKIP_HINT}.")
            keep.append(problem is None)
        return table.filter(pa.array(keep, type=pa.bool_()))


class EpochRows:
    """``map_batches`` function: every row of ``tasks`` (all when empty) once per epoch it trains in.

    Epoch ``e`` keeps the rows whose key ``order_keys(id, seed, e)`` is at most ``cutoffs[e]`` (the
    whole batches of that epoch) and tags them with two sort columns: ``ORDER_COLUMN`` (the key)
    and ``BUCKET_COLUMN`` = ``e × parts`` + the key's range among ``parts`` equal ranges. Sorting by
    (bucket, key) yields epoch 0 in key order, then epoch 1, ...; the buckets are the partitions of
    a distributed sort.
    """

    def __init__(self, seed: int, cutoffs: Sequence[int], parts: int, tasks: Sequence[str] = ()):
        self.seed, self.cutoffs, self.parts, self.tasks = seed, list(cutoffs), parts, set(tasks)

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.tasks:
            table = table.filter(pa.array([t in self.tasks for t in table.column("task").to_pylist()], type=pa.bool_()))
        ids = table.column("id").to_pylist()
        epochs = []
        for epoch, cutoff in enumerate(self.cutoffs):
            keys = order_keys(ids, self.seed, epoch)
            keep = keys <= cutoff
            ranges = keys[keep] // np.int64(-(-(2**63) // self.parts)) if self.parts > 1 else np.zeros(int(keep.sum()), np.int64)
            buckets = epoch * self.parts + ranges
            epochs.append(
                table.filter(pa.array(keep))
                .append_column(ORDER_COLUMN, pa.array(keys[keep], type=pa.int64()))
                .append_column(BUCKET_COLUMN, pa.array(buckets, type=pa.int64()))
            )
        return pa.concat_tables(epochs)


@dataclass
class TrainSplit:
    """The validated train rows as a Ray Dataset, whether it is materialized, and its file count."""

    dataset: Any
    in_memory: bool
    num_files: int


def train_split(data_dir: str | Path, on_error: str, sort_in_memory_mb: float) -> TrainSplit:
    """The validated train split as a Ray Dataset (read once per run; every stage orders it its own way).

    When the split's Parquet shards total at most ``sort_in_memory_mb``, the validated rows are
    materialized in the object store and each stage sorts them in one task; larger splits stream
    from the files through Ray Data's distributed sort. Either way the order is the same.
    """
    files = [str(f) for f in shard_files(data_dir, "train")]
    in_memory = sum(os.path.getsize(f) for f in files) <= sort_in_memory_mb * 2**20
    with _footer_readers(files):
        dataset = ray.data.read_parquet(files).map_batches(ValidRows(on_error), batch_format="pyarrow")
    return TrainSplit(dataset.materialize() if in_memory else dataset, in_memory, len(files))


def train_dataset(split: TrainSplit, tasks: Sequence[str], seed: int, global_batch: int, total_batches: int, ids: Sequence[str]):
    """One stage's Ray Dataset: the rows of ``tasks`` from :func:`train_split` in training order, long
    enough for ``total_batches``.

    ``global_batch`` rows (per-worker batch × workers) make one batch of every worker;
    ``total_batches`` counts global batches (optimizer steps × grad_accum); ``ids`` are the usable
    rows of ``tasks`` (the driver validated the split): from them the driver finds where each
    epoch's whole batches end. All epochs are ordered by one sort on (epoch bucket, key): in one
    task for an in-memory split, else as Ray Data's distributed sort with a partition per bucket
    (the keys are uniform, so fixed boundaries split each epoch evenly and no sampling pass is needed).
    """
    if len(ids) < global_batch:
        raise ValueError(
            f"the train split has {len(ids)} usable rows, fewer than one global batch of "
            f"{global_batch}; lower the stage's batch_size or train.num_workers."
        )
    used = (len(ids) // global_batch) * global_batch
    epochs = math.ceil(total_batches / (len(ids) // global_batch))
    cutoffs = [int(np.sort(order_keys(ids, seed, e))[used - 1]) for e in range(epochs)]
    parts = 1 if split.in_memory else max(2, split.num_files)
    tagged = split.dataset.map_batches(EpochRows(seed, cutoffs, parts, tasks), batch_format="pyarrow")
    if split.in_memory:
        return tagged.repartition(1).map_batches(_sort_rows, batch_format="pyarrow", batch_size=None)
    return tagged.sort([BUCKET_COLUMN, ORDER_COLUMN], boundaries=list(range(1, epochs * parts)))


def _sort_rows(table: pa.Table) -> pa.Table:
    """``map_batches`` function over the whole (single-block) stream: rows in (bucket, key) order."""
    return table.sort_by([(BUCKET_COLUMN, "ascending"), (ORDER_COLUMN, "ascending")])


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
