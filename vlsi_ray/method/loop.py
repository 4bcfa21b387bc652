"""The training loop every stage uses: AdamW, a cosine LR per stage, gradient accumulation, seeded order.

One function, :func:`train_stage`, runs any objective from :mod:`vlsi_ray.method.steps` over rows
of the train split. Batch order comes from :class:`BatchOrder` (a seeded permutation per epoch), so
a stage is reproducible from its seed alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from vlsi_ray.config import OptimConfig
from vlsi_ray.metrics import MetricsWriter


@dataclass
class BatchOrder:
    """Seeded, epoch-wise shuffled batches of row indices; ``position`` counts batches handed out."""

    num_rows: int
    batch_size: int
    seed: int
    position: int = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch (the remainder of a permutation is dropped)."""
        return max(1, self.num_rows // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            epoch, index = divmod(self.position, self.batches_per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            start = index * self.batch_size
            self.position += 1
            yield order[start : start + self.batch_size].tolist()


def total_optimizer_steps(opt: OptimConfig, num_rows: int) -> int:
    """Optimizer steps of a stage: ``max_steps``, else ``epochs`` passes of ``num_rows``."""
    if opt.max_steps > 0:
        return opt.max_steps
    per_step = opt.batch_size * opt.grad_accum
    return max(1, math.ceil(opt.epochs * num_rows / per_step))


def cosine_lr(step: int, total: int, opt: OptimConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine ``lr`` → ``min_lr``."""
    if opt.warmup_steps and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    span = max(1, total - opt.warmup_steps - 1)  # the last step trains at min_lr
    progress = min(1.0, (step - opt.warmup_steps) / span)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * progress))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_stage(
    name: str,
    objective: Callable[[dict], "object"],
    parameters: Sequence[nn.Parameter],
    rows: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    opt: OptimConfig,
    seed: int,
    device: torch.device,
    writer: MetricsWriter | None = None,
    modules: Sequence[nn.Module] = (),
) -> list[dict]:
    """Train ``parameters`` on ``objective`` over ``rows``; return one metrics dict per optimizer step.

    ``modules`` are put in train mode for the stage (and back in eval mode after). Progress is
    printed every ``opt.log_every`` steps; every step's metrics go to ``writer`` if given.
    """
    if not parameters:
        raise ValueError(f"stage {name} has no trainable parameters; check which parameter groups it unfreezes.")
    if not rows:
        raise ValueError(f"stage {name} has no training rows; check data.dir and stages.{name}.tasks.")
    total = total_optimizer_steps(opt, len(rows))
    optimizer = torch.optim.AdamW(parameters, lr=opt.lr, weight_decay=opt.weight_decay)
    order = iter(BatchOrder(len(rows), min(opt.batch_size, len(rows)), seed))
    for module in modules:
        module.train()
    history: list[dict] = []
    started = time.perf_counter()
    print(f"[{name}] {total} optimizer steps × {opt.batch_size}×{opt.grad_accum} rows, {len(rows)} train rows", flush=True)
    for step in range(total):
        lr = cosine_lr(step, total, opt)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro: list[dict] = []
        for _ in range(opt.grad_accum):
            batch = _to_device(collate([rows[i] for i in next(order)]), device)
            out = objective(batch)
            (out.loss / opt.grad_accum).backward()
            micro.append(out.metrics)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, opt.grad_clip if opt.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = _reduce(micro)
        record.update(stage=name, step=step + 1, lr=lr, grad_norm=float(grad_norm))
        history.append(record)
        if writer is not None:
            writer.write(record)
        if (step + 1) % opt.log_every == 0 or step + 1 == total:
            elapsed = time.perf_counter() - started
            rate = (step + 1) * opt.batch_size * opt.grad_accum / elapsed
            eta = elapsed / (step + 1) * (total - step - 1)
            print(
                f"[{name}] step {step + 1}/{total} loss {record['loss']:.4f} lr {lr:.2e} "
                f"{rate:.1f} samples/s eta {eta:.0f}s",
                flush=True,
            )
    for module in modules:
        module.eval()
    return history


def _reduce(micro: list[dict]) -> dict:
    """Average numeric metrics over micro-batches; keep lists (matched indices) per micro-batch."""
    out: dict = {}
    for key in micro[0]:
        values = [m[key] for m in micro]
        out[key] = values if isinstance(values[0], list) else float(np.mean(values))
    return out
