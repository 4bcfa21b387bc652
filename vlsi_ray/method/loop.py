"""The training loop every stage uses: AdamW, a cosine LR per stage, gradient accumulation, seeded order.

:func:`run_steps` is the one loop: it takes any objective from :mod:`vlsi_ray.method.steps`, a
:class:`Stepper` (plain AdamW here; DeepSpeed on Ray Train workers) and an iterator of collated
batches. The in-process runner feeds it from :class:`~vlsi_ray.data.order.BatchOrder`; the Ray Train workers feed it
from Ray Data in the very same order (:func:`~vlsi_ray.data.order.order_keys` defines it), so both paths see the same
batches and a stage is reproducible from its seed alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vlsi_ray.data.order import BatchOrder
from vlsi_ray.metrics import MetricsWriter


@dataclass
class OptimConfig:
    """One training stage (the config's ``stages.<stage>`` sections): AdamW with a cosine LR from ``lr`` to
    ``min_lr`` (paper: 1e-4 → 1e-6), ``batch_size`` × ``grad_accum`` rows per optimizer step."""

    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 16
    max_steps: int = 0  # optimizer steps; 0 means `epochs` passes over the train split
    epochs: float = 1.0
    tasks: list[str] = field(default_factory=list)  # train rows of these task types only; empty = all
    grad_clip: float = 1.0
    log_every: int = 10


def total_optimizer_steps(opt: OptimConfig, num_rows: int, num_workers: int = 1) -> int:
    """Optimizer steps of a stage: ``max_steps``, else ``epochs`` passes of ``num_rows``.

    One optimizer step consumes ``batch_size × grad_accum`` rows on each of ``num_workers`` workers.
    """
    if opt.max_steps > 0:
        return opt.max_steps
    per_step = opt.batch_size * opt.grad_accum * num_workers
    return max(1, math.ceil(opt.epochs * num_rows / per_step))


def cosine_lr(step: int, total: int, opt: OptimConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine ``lr`` → ``min_lr``."""
    if opt.warmup_steps and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    span = max(1, total - opt.warmup_steps - 1)  # the last step trains at min_lr
    progress = min(1.0, (step - opt.warmup_steps) / span)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * progress))


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a collated batch's tensors to ``device`` (lists such as ids stay as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Stepper:
    """AdamW over ``parameters`` with gradient clipping; averages gradients over a process group.

    ``backward`` is called once per micro-batch, ``step`` once per optimizer step. When
    ``torch.distributed`` is initialised with more than one rank (Ray Train workers without
    DeepSpeed), gradients are all-reduced (mean) before clipping, i.e. plain data parallelism;
    ``average`` (in place, over the list of gradients) replaces that with another group's mean (the
    teacher replicas' step 1, whose default group is a tensor-parallel replica's).
    ``dtype`` is the objective's compute dtype: float16 adds dynamic loss scaling (a skipped step
    on overflow, as ``torch.amp.GradScaler`` does); the parameters themselves must be float32
    (the objectives keep float32 masters), so AdamW never updates a low-precision weight.
    """

    #: Whether :meth:`load_rank_states` needs every rank's saved state, not only this rank's.
    needs_every_rank_state = False

    def __init__(
        self,
        parameters: Sequence[nn.Parameter],
        opt: OptimConfig,
        dtype: torch.dtype = torch.float32,
        average: Callable[[list[torch.Tensor]], None] | None = None,
    ):
        self.parameters = list(parameters)
        self.average = average
        low = [p.dtype for p in self.parameters if p.dtype != torch.float32]
        if low:
            raise ValueError(
                f"AdamW would update {low[0]} weights directly; keep float32 master weights (vlsi_ray.models.precision)."
            )
        self.grad_clip = opt.grad_clip
        self.optimizer = torch.optim.AdamW(self.parameters, lr=opt.lr, weight_decay=opt.weight_decay)
        device = self.parameters[0].device.type if self.parameters else "cpu"
        self.scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None

    def set_lr(self, lr: float) -> None:
        """Learning rate of the coming optimizer step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        """Accumulate the gradient of one micro-batch's ``loss / grad_accum`` (scaled under float16)."""
        loss = loss / grad_accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float:
        """Average gradients over ranks, clip, update, zero; return the pre-clip gradient norm
        (``inf``/``nan`` on a float16 overflow, whose update is skipped)."""
        dist = torch.distributed
        if self.average is not None:
            for p in self.parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.average([p.grad for p in self.parameters])
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for p in self.parameters:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)  # an overflow on any rank reaches every rank: all skip together
                p.grad.div_(world)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        limit = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, limit)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def state_dict(self) -> dict:
        """Optimizer state (and the float16 loss scale) for a checkpoint."""
        state = self.optimizer.state_dict()
        return state if self.scaler is None else {"optimizer": state, "scaler": self.scaler.state_dict()}

    def load_rank_states(self, states: list[dict], rank: int) -> None:
        """Restore this rank's :meth:`state_dict` from every rank's (index = rank; all equal here)."""
        state = states[rank]
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
            state = state["optimizer"]
        self.optimizer.load_state_dict(state)

    def wrap(self, objective):
        """The objective as the loop calls it (DeepSpeed runs it through its engine; here, unchanged)."""
        return objective

    def gathered(self, parameters: Sequence[nn.Parameter], modify: bool = False):
        """Whole parameters inside the block: they always are here (ZeRO-3 partitions them)."""
        return contextlib.nullcontext()


def run_steps(
    name: str,
    objective: Callable[[dict], object],
    stepper: Stepper,
    batches: Iterator[dict],
    opt: OptimConfig,
    total: int,
    device: torch.device,
    writer: MetricsWriter | None = None,
    modules: Sequence[nn.Module] = (),
    start_step: int = 0,
    after_step: Callable[[int, dict], None] | None = None,
    verbose: bool = True,
    step_metrics: Callable[[], dict] | None = None,
) -> list[dict]:
    """Optimizer steps ``start_step .. total-1`` of a stage; return one metrics dict per step.

    Each step takes ``opt.grad_accum`` batches from ``batches``. ``modules`` are in train mode
    during the stage (eval mode after). Every step's metrics go to ``writer``; progress is printed
    every ``opt.log_every`` steps when ``verbose``; ``after_step(step, record)`` runs after each
    step (checkpointing and reporting on Ray); ``step_metrics()`` adds numbers to each step's record
    (the teacher client's wait time and bytes).
    """
    for module in modules:
        module.train()
    history: list[dict] = []
    started = time.perf_counter()
    if verbose:
        print(f"[{name}] steps {start_step + 1}..{total} × {opt.batch_size}×{opt.grad_accum} rows", flush=True)
    for step in range(start_step, total):
        step_started = time.perf_counter()
        lr = cosine_lr(step, total, opt)
        stepper.set_lr(lr)
        micro: list[dict] = []
        empty = 0
        for _ in range(opt.grad_accum):
            batch = next(batches)
            empty += int(not has_response_tokens(batch))
            out = objective(to_device(batch, device))
            stepper.backward(out.loss, opt.grad_accum)
            micro.append(out.metrics)
        grad_norm = stepper.step()
        record = _reduce(micro)
        if empty:  # cannot happen with indexed rows (each has a response token); a zero loss if it does
            record["empty_batches"] = empty
            print(f"[{name}] step {step + 1}: {empty} micro-batch(es) without response tokens trained nothing", flush=True)
        record.update(
            stage=name,
            step=step + 1,
            lr=lr,
            grad_norm=grad_norm,
            samples_per_s=opt.batch_size * opt.grad_accum / (time.perf_counter() - step_started),
        )
        if step_metrics is not None:
            record.update(step_metrics())
        history.append(record)
        if writer is not None:
            writer.write(record)
        if after_step is not None:
            after_step(step + 1, record)
        done = step + 1 - start_step
        if verbose and ((step + 1) % opt.log_every == 0 or step + 1 == total):
            elapsed = time.perf_counter() - started
            rate = done * opt.batch_size * opt.grad_accum / elapsed
            eta = elapsed / done * (total - step - 1)
            print(
                f"[{name}] step {step + 1}/{total} loss {record['loss']:.4f} lr {lr:.2e} {rate:.1f} samples/s eta {eta:.0f}s",
                flush=True,
            )
    for module in modules:
        module.eval()
    return history


def has_response_tokens(batch: dict) -> bool:
    """Whether a collated batch has a label to learn from (``labels [B, T]``; batches without labels count as having)."""
    labels = batch.get("labels")
    return labels is None or bool((labels != -100).any())


def train_stage(
    name: str,
    objective: Callable[[dict], object],
    parameters: Sequence[nn.Parameter],
    rows: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    opt: OptimConfig,
    seed: int,
    device: torch.device,
    writer: MetricsWriter | None = None,
    modules: Sequence[nn.Module] = (),
    dtype: torch.dtype = torch.float32,
    lengths: Sequence[int] | None = None,
    group_rows: int = 0,
) -> list[dict]:
    """Train ``parameters`` on ``objective`` over ``rows`` in this process (AdamW, seeded order;
    ``dtype``: the objective's compute dtype, see :class:`Stepper`; ``lengths`` and ``group_rows``:
    length-grouped batches, see :func:`~vlsi_ray.data.order.epoch_order`).

    Returns one metrics dict per optimizer step.
    """
    if not parameters:
        raise ValueError(f"stage {name} has no trainable parameters; check which parameter groups it unfreezes.")
    if not rows:
        raise ValueError(f"stage {name} has no training rows; check data.dir and stages.{name}.tasks.")
    total = total_optimizer_steps(opt, len(rows))
    order = BatchOrder([r["id"] for r in rows], min(opt.batch_size, len(rows)), seed, lengths=lengths, group_rows=group_rows)
    batches = (collate([rows[i] for i in index]) for index in order)
    return run_steps(name, objective, Stepper(parameters, opt, dtype), batches, opt, total, device, writer, modules)


def _reduce(micro: list[dict]) -> dict:
    """Average numeric metrics over micro-batches; keep lists (matched indices) per micro-batch."""
    out: dict = {}
    for key in micro[0]:
        values = [m[key] for m in micro]
        out[key] = values if isinstance(values[0], list) else float(np.mean(values))
    return out
