"""The train split as a Ray Data pipeline: Parquet shards → validated rows → seeded epochs → workers.

The order is the one :class:`vlsi_ray.method.loop.BatchOrder` gives in-process: epoch ``e`` sorts
the rows by :func:`order_keys` ``(id, seed, e)`` and keeps whole global batches. The epochs are
concatenated into one stream, so a Ray Train worker simply reads batches until the stage has its
steps, and a resumed worker skips the batches its checkpoint already consumed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pyarrow as pa
from ray.data.collate_fn import NumpyBatchCollateFn

from vlsi_ray.data.shards import CorruptRowError, SKIP_HINT, shard_files, validate_row
from vlsi_ray.method.loop import order_keys

ORDER_COLUMN = "_order"


class ValidRows:
    """``map_batches`` function: keep rows of ``tasks`` that :func:`validate_row` accepts.

    A corrupt row is dropped (``on_error="skip"``; the driver counts them when it reads the
    splits) or raises :class:`CorruptRowError` naming the row (``"raise"``).
    """

    def __init__(self, tasks: Sequence[str], on_error: str):
        self.tasks = set(tasks)
        self.on_error = on_error

    def __call__(self, table: pa.Table) -> pa.Table:
        keep = []
        for i, row in enumerate(table.to_pylist()):
            problem = validate_row(row)
            if problem is not None and self.on_error == "raise":
                raise CorruptRowError(f"Row {row.get('id')!r} is corrupt ({problem}); {SKIP_HINT}.")
            keep.append(problem is None and (not self.tasks or row["task"] in self.tasks))
        return table.filter(pa.array(keep, type=pa.bool_()))


class EpochKeys:
    """``map_batches`` function: add the epoch's sort key column (uint64) from the row ids."""

    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch = seed, epoch

    def __call__(self, table: pa.Table) -> pa.Table:
        keys = order_keys(table.column("id").to_pylist(), self.seed, self.epoch)
        return table.append_column(ORDER_COLUMN, pa.array(keys, type=pa.int64()))


def train_dataset(data_dir: str | Path, tasks: Sequence[str], on_error: str, seed: int, global_batch: int,
                  total_batches: int, rows: int):
    """A Ray Dataset of the train split in training order, long enough for ``total_batches``.

    ``global_batch`` rows (per-worker batch × workers) make one batch of every worker;
    ``total_batches`` counts global batches (optimizer steps × grad_accum); ``rows`` is the number
    of usable rows (the driver counted them when it validated the split). Each epoch is a
    range-partitioned sort on the hash keys (uniform, so fixed boundaries split it evenly and no
    sampling pass is needed).
    """
    import ray

    files = [str(f) for f in shard_files(data_dir, "train")]
    base = ray.data.read_parquet(files).map_batches(ValidRows(tasks, on_error), batch_format="pyarrow")
    parts = max(2, len(files))
    boundaries = [(2**63 // parts) * i for i in range(1, parts)]
    if rows < global_batch:
        raise ValueError(
            f"the train split in {data_dir} has {rows} usable rows, fewer than one global batch of "
            f"{global_batch}; lower the stage's batch_size or train.num_workers."
        )
    batches_per_epoch = rows // global_batch
    epochs = math.ceil(total_batches / batches_per_epoch)
    per_epoch = [
        base.map_batches(EpochKeys(seed, e), batch_format="pyarrow").sort(ORDER_COLUMN, boundaries=boundaries).limit(batches_per_epoch * global_batch)
        for e in range(epochs)
    ]
    return per_epoch[0].union(*per_epoch[1:]) if epochs > 1 else per_epoch[0]


class RayCollate(NumpyBatchCollateFn):
    """Ray Data's collate hook around the one collate path (:class:`ChatCollator`)."""

    def __init__(self, collator):
        super().__init__()
        self.collator = collator

    def __call__(self, batch: dict) -> dict:
        """Columns ``{name: np.ndarray [B]}`` -> the collated model batch."""
        return self.collator(batch)
