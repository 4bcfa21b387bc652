"""DeepSpeed ZeRO-2/3 as a :class:`~vlsi_ray.method.loop.Stepper` for Ray Train workers (``train.deepspeed_stage``).

The engine wraps an :class:`ObjectiveModule`: the modules a stage trains, with the stage's
objective as ``forward``, so every micro-batch runs as an engine forward (ZeRO-3 gathers the
partitioned parameters around it and accumulates gradients across micro-batches correctly only
then). DeepSpeed reuses the process group Ray Train set up (gloo on CPU, NCCL on GPU).

Under ZeRO-3 a parameter holds only this rank's shard outside a forward; :meth:`DeepSpeedStepper.gathered`
gathers whole tensors for checkpoints and the final save (every rank must enter it: it is a collective).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from vlsi_ray.config import OptimConfig
from vlsi_ray.method.steps import StepOutput

#: ZeRO stages ``train.deepspeed_stage`` accepts (0 is plain data parallelism without DeepSpeed).
ZERO_STAGES = (2, 3)

#: DeepSpeed's shared-memory all-reduce op on the CPU accelerator (``ShareMemCommBuilder.NAME``).
SHM_COMM_OP = "deepspeed_shm_comm"


def needs_vision_filler(stage: int, world_size: int) -> bool:
    """Whether a Train worker's batches must always run the vision tower: under ZeRO with more than one
    rank, where parameter gathers (ZeRO-3) and gradient buckets (ZeRO-2, a trained projector) are
    collectives that a rank with a text-only micro-batch would leave the others waiting in."""
    return stage in ZERO_STAGES and world_size > 1


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce on the CPU accelerator.

    DeepSpeed's communication backend JIT-compiles that C++ op when it starts on a fresh machine,
    only for ``inference_all_reduce``, which ZeRO training never calls
    (its collectives go through ``torch.distributed``: gloo here). Marking the op incompatible in
    DeepSpeed's probe of compatible ops skips the build; the CUDA accelerator has no such op.
    """
    import deepspeed.ops  # noqa: PLC0415 - DeepSpeed loads only for train.deepspeed_stage > 0
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 - DeepSpeed loads only for train.deepspeed_stage > 0

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def deepspeed_config(opt: OptimConfig, stage: int, dtype: torch.dtype = torch.float32) -> dict:
    """The DeepSpeed config of one stage: micro-batch, accumulation, clipping, the ZeRO stage, and
    the ``bf16``/``fp16`` block of a low-precision ``dtype`` (the engine then keeps the model's
    weights in ``dtype`` and float32 masters in its optimizer partitions; fp16 with dynamic loss scaling)."""
    config = {
        "train_micro_batch_size_per_gpu": opt.batch_size,
        "gradient_accumulation_steps": opt.grad_accum,
        "gradient_clipping": opt.grad_clip if opt.grad_clip > 0 else 0.0,
        # memory_efficient_linear: ZeRO-3 would replace torch's F.linear for the whole process, for good ("this
        # will persist unless manually reset"): every later linear of the worker (the stages after this one,
        # evaluation) would run through DeepSpeed's, which computes input gradients nothing needs
        "zero_optimization": {"stage": stage, "memory_efficient_linear": False},
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam needs CUDA
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # 0: dynamic
    return config


class ObjectiveModule(nn.Module):
    """``modules`` as children, ``objective(batch)`` as forward, returning ``(loss [], metrics)``."""

    def __init__(self, objective: Callable, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.objective = objective

    def forward(self, batch: dict):
        out = self.objective(batch)
        return out.loss, out.metrics


class DeepSpeedStepper:
    """AdamW inside a DeepSpeed engine; same interface as :class:`vlsi_ray.method.loop.Stepper`, plus
    :meth:`wrap` (run the objective through the engine) and :meth:`gathered` (whole parameters)."""

    def __init__(
        self,
        parameters: Sequence[nn.Parameter],
        opt: OptimConfig,
        stage: int,
        modules: dict[str, nn.Module],
        objective: Callable | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        import deepspeed  # noqa: PLC0415 - DeepSpeed loads only for train.deepspeed_stage > 0

        if stage not in ZERO_STAGES:
            raise ValueError(f"train.deepspeed_stage must be one of {ZERO_STAGES} for DeepSpeed (0 disables it), got {stage}.")
        skip_shm_comm_build()  # before DeepSpeed's communication backend starts
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            deepspeed.init_distributed()
        self.stage = stage
        self.container = ObjectiveModule(objective, modules)
        optimizer = torch.optim.AdamW(list(parameters), lr=opt.lr, weight_decay=opt.weight_decay)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.container, optimizer=optimizer, config=deepspeed_config(opt, stage, dtype)
        )

    @property
    def needs_every_rank_state(self) -> bool:
        """ZeRO-2 re-partitions the optimizer shards of every rank on load; ZeRO-3 reads its own."""
        return self.stage == 2

    def wrap(self, objective: Callable) -> Callable:
        """``objective`` run as the engine's forward: ``batch -> StepOutput``."""
        self.container.objective = objective

        def run(batch: dict) -> StepOutput:
            loss, metrics = self.engine(batch)
            return StepOutput(loss, metrics)

        return run

    @contextlib.contextmanager
    def gathered(self, parameters: Sequence[nn.Parameter], modify: bool = False) -> Iterator[None]:
        """Whole tensors in ``parameters`` inside the block (ZeRO-3; a no-op for ZeRO-2). With ``modify``,
        what rank 0 writes into them is kept and re-partitioned on exit. Every rank must enter."""
        if self.stage != 3:
            yield
            return
        import deepspeed  # noqa: PLC0415 - DeepSpeed loads only for train.deepspeed_stage > 0

        with deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=0 if modify else None):
            yield

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
        """This rank's (partitioned) optimizer state, with its fp32 master shards."""
        return self.optimizer.state_dict()

    def load_rank_states(self, states: list[dict], rank: int) -> None:
        """Restore from every rank's :meth:`state_dict` (index = rank; same world size and ZeRO stage).

        ZeRO-2 merges the shards (optimizer state and fp32 masters) of all ranks and re-partitions
        them; ZeRO-3 reads this rank's shard, whose fp32 masters also restore the parameters.
        """
        self.optimizer.load_state_dict(states, load_from_fp32_weights=self.stage == 2)
