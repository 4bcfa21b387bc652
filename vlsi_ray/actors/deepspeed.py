"""DeepSpeed ZeRO-2 as a :class:`~vlsi_ray.method.loop.Stepper` for Ray Train workers (``train.deepspeed_stage``).

The objectives call the backbone and verbalizers directly; the engine wraps a container of those
modules, so ZeRO's gradient hooks fire on the same forward. DeepSpeed reuses the process group Ray
Train set up (gloo on CPU, NCCL on GPU). Only ZeRO-2 is offered: ZeRO-3 partitions the parameters
themselves, and the checkpoints here copy trainable tensors directly.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vlsi_ray.config import OptimConfig


def deepspeed_config(opt: OptimConfig, stage: int) -> dict:
    """The DeepSpeed config of one stage: micro-batch, accumulation, clipping and the ZeRO stage."""
    return {
        "train_micro_batch_size_per_gpu": opt.batch_size,
        "gradient_accumulation_steps": opt.grad_accum,
        "gradient_clipping": opt.grad_clip if opt.grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam needs CUDA
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedStepper:
    """AdamW inside a DeepSpeed engine; same interface as :class:`vlsi_ray.method.loop.Stepper`."""

    def __init__(self, parameters: Sequence[nn.Parameter], opt: OptimConfig, stage: int, container: nn.Module):
        import deepspeed

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            deepspeed.init_distributed()
        optimizer = torch.optim.AdamW(list(parameters), lr=opt.lr, weight_decay=opt.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=container, optimizer=optimizer, config=deepspeed_config(opt, stage)
        )

    def set_lr(self, lr: float) -> None:
        """Learning rate of the coming optimizer step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        """One micro-batch: the engine scales by 1/grad_accum and steps at the accumulation boundary."""
        self.engine.backward(loss)
        self.engine.step()

    def step(self) -> float:
        """The update already happened at the boundary micro-batch; return its gradient norm."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def state_dict(self) -> dict:
        """This rank's (partitioned) optimizer state."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (same world size and ZeRO stage)."""
        self.optimizer.load_state_dict(state)
