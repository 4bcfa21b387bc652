"""Experiment tracking on rank 0: wandb (offline unless ``WANDB_MODE`` says otherwise) or nothing.

The same records also go to ``metrics.jsonl`` (:mod:`vlsi_ray.metrics`), which the report reads;
wandb is for people who watch runs live. Matched teacher layers are logged per student layer
(``matched/<i>``), so wandb's charts of them over steps are the paper's Fig. 5.
"""

from __future__ import annotations

from pathlib import Path


class Tracker:
    """``log(record, step)`` to wandb (``kind="wandb"``) or nowhere (``"none"``); ``finish()`` at the end."""

    def __init__(self, kind: str, run_dir: str | Path, group: str, name: str, config: dict | None = None):
        self.run = None
        if kind == "wandb":
            import wandb  # noqa: PLC0415 - wandb (about a second to import) loads only with ray.logger=wandb

            self.run = wandb.init(
                project="vlsi-ray", group=group, name=name, dir=str(run_dir), config=config or {}, reinit="create_new"
            )

    def log(self, record: dict, step: int) -> None:
        """Numeric values as they are; ``matched`` (per micro-batch: per student layer: teacher layers) as
        ``matched/<student layer>`` scalars of the first micro-batch."""
        if self.run is None:
            return
        data = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        matched = record.get("matched") or [[]]
        for i, picks in enumerate(matched[0]):
            for j, layer in enumerate(picks):
                data[f"matched/{i}" + (f".{j}" if j else "")] = layer
        self.run.log(data, step=step)

    def finish(self) -> None:
        """Close the wandb run (flushes the offline files)."""
        if self.run is not None:
            self.run.finish()
            self.run = None
