"""What a run knows of its data before training: each split's row metadata, never its images or conversations.

A :class:`SplitIndex` holds, per usable row, the shards' small columns (``id``, ``task``, ``source``,
``answer``, ``tokens``) as one Arrow table: the driver plans stages (row counts, the seeded batch
order, where each epoch ends), picks evaluation rows and scores answers from it alone, whatever the
dataset's size. Rows are read whole only where they are used: in the workers, the teacher actors and
the evaluation tasks (or, in the in-process runner, in this process).

Lengths are settled here, before any training: a row longer than ``data.max_length`` (image tokens
included) is a bad row, skipped and counted (``data.on_error=skip``) or refused (``raise``), as are
rows that do not validate or collate and rows whose chat template leaves no response token. Shards
written by ``jobs/prepare_data.py`` with the run's own student processor carry their rows' token
counts (:func:`measured_by`): nothing is read but the small columns. Other shards (the synthetic
task, data prepared without a student or with another one) are measured once per run by
:func:`measure_rows` — in this process or, on Ray, in Ray Data workers (:func:`measure_on_ray`) unless the
shards are small enough for the driver to measure them sooner than a worker pool starts (:func:`measure_on_ray_or_here`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from vlsi_ray.data.collate import IGNORE_INDEX, ChatCollator
from vlsi_ray.data.shards import SKIP_HINT, CorruptRowError, ReadStats, load_manifest, shard_files, validate_row

log = logging.getLogger(__name__)

#: The columns an index reads: everything but the images and the conversation.
META = ("id", "task", "source", "answer", "tokens")
MEASURED = pa.schema([("id", pa.string()), ("tokens", pa.int32()), ("problem", pa.string())])
#: Bad rows named one by one in the log (the rest are counted).
_LOGGED = 20


@dataclass
class SplitIndex:
    """One split's usable rows as metadata: ``table`` (:data:`META` columns, shard order), the shard
    ``files``, the read ``stats`` (rows read, kept, skipped with their reasons) and whether the run
    ``measured`` the rows' ``tokens`` itself (else they are the shards' own)."""

    split: str
    files: list[str]
    table: pa.Table
    stats: ReadStats = field(default_factory=ReadStats)
    measured: bool = False

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> list:
        """One metadata column as a Python list."""
        return self.table.column(name).to_pylist()

    def ids(self, tasks: Sequence[str] = ()) -> list[str]:
        """Ids of the usable rows of ``tasks`` (all rows when empty), in shard order."""
        if not tasks:
            return self.column("id")
        wanted = set(tasks)
        return [i for i, t in zip(self.column("id"), self.column("task")) if t in wanted]

    def lengths(self, tasks: Sequence[str] = ()) -> list[int]:
        """Token counts of :meth:`ids` ``(tasks)``, in the same order."""
        if not tasks:
            return self.column("tokens")
        wanted = set(tasks)
        return [n for n, t in zip(self.column("tokens"), self.column("task")) if t in wanted]

    def excluded(self) -> set[str]:
        """Ids of the rows this index left out (bad, over-long)."""
        return set(self.stats.skipped_ids)


def measured_by(manifest: dict | None) -> str | None:
    """The processor fingerprint the shards' token counts were measured with (None: not measured)."""
    if not manifest or not manifest.get("tokens_measured"):
        return None
    return manifest.get("measured_with")


def measure_rows(rows: Iterable[dict], collator: ChatCollator) -> list[dict]:
    """Validate and measure rows: ``[{"id", "tokens", "problem"}]`` with ``tokens`` the untruncated length
    (image tokens included) and ``problem`` why the row cannot train (None when it can)."""
    out = []
    for row in rows:
        problem, tokens = validate_row(row), None
        if problem is None:
            try:
                ids, labels, _ = collator.encode(row)
            except ValueError as err:  # RowError, an image the processor refuses
                problem = str(err).split(": ", 1)[-1]
            else:
                tokens = len(ids)
                if all(label == IGNORE_INDEX for label in labels):
                    problem = "no response tokens after the chat template"
        out.append({"id": str(row.get("id")), "tokens": tokens, "problem": problem})
    return out


class MeasureRows:
    """``map_batches`` (Ray Data): shard rows -> :data:`MEASURED` rows, images decoded in the worker."""

    def __init__(self, collator: ChatCollator):
        self.collator = ChatCollator(collator.tokenizer, collator.image_processor, collator.family, max_length=None, cache_size=0)

    def __call__(self, table: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(measure_rows(table.to_pylist(), self.collator), schema=MEASURED)


def measure_in_process(files: Sequence[str], collator: ChatCollator) -> pa.Table:
    """:func:`measure_rows` over the shard ``files`` in this process, one row group at a time."""
    untruncated = ChatCollator(collator.tokenizer, collator.image_processor, collator.family, max_length=None, cache_size=0)
    parts = []
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            parts.append(pa.Table.from_pylist(measure_rows(batch.to_pylist(), untruncated), schema=MEASURED))
    return pa.concat_tables(parts) if parts else MEASURED.empty_table()


def measure_on_ray(files: Sequence[str], collator: ChatCollator) -> pa.Table:
    """:func:`measure_rows` over the shard ``files`` in Ray Data workers; only the small results reach the caller."""
    dataset = ray.data.read_parquet(list(files)).map_batches(MeasureRows, fn_constructor_args=(collator,),
                                                             batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(min_size=1))  # fmt: skip
    parts = list(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(parts) if parts else MEASURED.empty_table()


def measure_on_ray_or_here(files: Sequence[str], collator: ChatCollator, in_driver_mb: float) -> pa.Table:
    """:func:`measure_in_process` when the shard ``files`` total at most ``in_driver_mb`` MB
    (``data.measure_in_driver_mb``), else :func:`measure_on_ray`: the same table either way."""
    if sum(os.path.getsize(f) for f in files) <= in_driver_mb * 2**20:
        return measure_in_process(files, collator)
    return measure_on_ray(files, collator)


def read_index(
    data_dir: str | Path,
    split: str,
    max_length: int | None,
    on_error: str,
    measure: Callable[[Sequence[str]], pa.Table] | None = None,
) -> SplitIndex:
    """The :class:`SplitIndex` of ``split`` in ``data_dir``.

    ``measure(files)`` measures the rows (:func:`measure_in_process`, :func:`measure_on_ray`; its table
    may hold other splits' rows too: they are looked up by id); None trusts the shards' ``tokens`` column
    (shards prepared with the run's processor: validated and measured then). Rows that are bad or longer than ``max_length`` are skipped and counted
    (``on_error="skip"``) or raise :class:`CorruptRowError` naming the first (``"raise"``).
    """
    files = [str(f) for f in shard_files(data_dir, split)]
    for path in files:
        missing = [c for c in META if c not in pq.read_schema(path).names]
        if missing:
            raise ValueError(
                f"{path} lacks the row schema's column(s) {', '.join(missing)}; convert the data again with "
                "jobs/prepare_data.py (or delete the shards of an older synthetic task to regenerate them)."
            )
    table = pq.read_table(files, columns=list(META))
    problems: dict[str, str] = {}
    if measure is not None:
        measured, ids = measure(files), table.column("id").to_pylist()
        lengths = dict(zip(measured.column("id").to_pylist(), measured.column("tokens").to_pylist()))
        mine = set(ids)
        problems = {
            i: p for i, p in zip(measured.column("id").to_pylist(), measured.column("problem").to_pylist()) if p and i in mine
        }
        tokens = pa.array([lengths.get(i) for i in ids], type=pa.int32())
        table = table.set_column(table.schema.get_field_index("tokens"), "tokens", tokens)
    if max_length is not None:
        for row_id, n in zip(table.column("id").to_pylist(), table.column("tokens").to_pylist()):
            if n is not None and n > max_length and row_id not in problems:
                problems[row_id] = f"over-long: {n} tokens > data.max_length={max_length}"
    stats = ReadStats(read=table.num_rows, files=files)
    if problems:
        _refuse_or_log(problems, split, on_error)
        keep = pa.array([i not in problems for i in table.column("id").to_pylist()], type=pa.bool_())
        table = table.filter(keep)
        stats.skipped, stats.skipped_ids, stats.reasons = len(problems), sorted(problems), problems
    stats.kept = table.num_rows
    return SplitIndex(split, files, table, stats, measured=measure is not None)


def _refuse_or_log(problems: dict[str, str], split: str, on_error: str) -> None:
    first = next(iter(problems))
    if on_error == "raise":
        raise CorruptRowError(f"{split} row {first!r} cannot train ({problems[first]}); fix or drop it, or {SKIP_HINT}.")
    for row_id in list(problems)[:_LOGGED]:
        log.warning("skipping %s row %r: %s", split, row_id, problems[row_id])
    if len(problems) > _LOGGED:
        log.warning("skipping %d more bad %s rows (the report lists the counts)", len(problems) - _LOGGED, split)


def needs_measuring(data_dir: str | Path, fingerprint: str | None) -> bool:
    """Whether the shards in ``data_dir`` must be measured with the processor of ``fingerprint``: yes unless
    ``jobs/prepare_data.py`` measured them with the same processor and resolution."""
    measured = measured_by(load_manifest(data_dir))
    return measured is None or fingerprint is None or measured != fingerprint
