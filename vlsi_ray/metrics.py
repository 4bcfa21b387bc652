"""Run metrics: one JSON object per line in ``<run_dir>/metrics.jsonl``, read back for reports and plots."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


class MetricsWriter:
    """Append-only JSONL writer; every record is flushed so a killed run keeps what it logged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        """Append one record (JSON-serialisable values)."""
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path, stage: str | None = None) -> Iterator[dict]:
    """Records of ``path`` in order, optionally only those of ``stage``."""
    path = Path(path)
    if not path.exists():
        return
    with path.open() as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                if stage is None or record.get("stage") == stage:
                    yield record


def last_attempt(records: Iterable[dict]) -> list[dict]:
    """One record per step, the latest: a resumed stage logs its steps again from its checkpoint on."""
    by_step: dict[int, dict] = {}
    for record in records:
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def write_stage_summary(path: str | Path, stage: str, history: list[dict], seconds: float) -> None:
    """Write the JSON that marks ``stage`` finished (steps, seconds, first and last loss) to ``path``."""
    summary = {"stage": stage, "steps": len(history), "seconds": round(seconds, 1)}
    if history:
        summary["first_loss"], summary["last_loss"] = history[0]["loss"], history[-1]["loss"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomically: the driver's watcher acts on the file's existence and reads it at once
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(summary, indent=2))
    os.replace(partial, path)
