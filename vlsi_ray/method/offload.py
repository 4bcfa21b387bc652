"""ZeRO-2-Offload AdamW: the teacher replicas' step 1 with its optimizer state sharded over them, on the host.

Step 1 trains a 72B teacher's 20 verb-FFNs (about 4B parameters at d = 8,192) on every teacher replica at
once. Plain float32 AdamW keeps 16 bytes a parameter on each GPU (master, gradient, two moments: 64 GB),
next to the replica's share of the frozen teacher: it cannot fit 80 GB. :class:`OffloadStepper` keeps on
the GPU only the weights in the compute dtype and, between a backward and its reduction, their gradients;
each of the ``world`` replicas owns ``1/world`` of every parameter (ZeRO stage 2's partition, per
parameter as FSDP2 does) and keeps that slice's float32 master, gradient accumulator and AdamW moments in
host memory, where AdamW runs (ZeRO-Offload's split). Per micro-batch each gradient is reduce-scattered
over the replicas (summed) and its slice added to the host accumulator in
float32; per optimizer step the slices are averaged, clipped by the global gradient norm, updated on the
host and all-gathered back into the GPU weights.

Parameters may be DTensors sharded over a tensor-parallel replica's ranks (``Verbalizers.shard``): each
rank then offloads its own local shard, and the gradient norm adds the ranks' sums of squares.

ref: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", SC 2020
(stage 2); Ren et al., "ZeRO-Offload: Democratizing Billion-Scale Model Training", USENIX ATC 2021.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vlsi_ray.method.loop import OptimConfig


def local(tensor: Tensor) -> Tensor:
    """A tensor's local part: a DTensor's shard on this rank, any other tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor split over ranks (not replicated on each)."""
    return any(p.is_shard() for p in getattr(tensor, "placements", ()))


class OffloadStepper:
    """AdamW over ``parameters`` with ZeRO-2 partitioned gradients and host-resident optimizer state.

    The :class:`~vlsi_ray.method.loop.Stepper` interface: ``backward`` once per micro-batch, ``step`` once
    per optimizer step. ``group``: a ``torch.distributed`` process group of the ``world`` replicas
    training the same parameters (``rank`` is this replica's; None with ``world`` 1); ``tensor_group``:
    the group over which DTensor parameters are sharded (None: the default group, when initialised).
    The parameters are cast to ``dtype`` (the objective's compute dtype) on their device; their float32
    values become this replica's masters. float16 is refused (no loss scaling here): use bfloat16.
    """

    #: Whether :meth:`load_rank_states` needs every rank's saved state (run_steps' interface).
    needs_every_rank_state = False

    def __init__(
        self,
        parameters: Sequence[nn.Parameter],
        opt: OptimConfig,
        dtype: torch.dtype = torch.float32,
        group=None,
        rank: int = 0,
        world: int = 1,
        tensor_group=None,
    ):
        if dtype == torch.float16:
            raise ValueError("the offloaded optimizer has no float16 loss scaling; train the teacher in bfloat16 or float32.")
        if world > 1 and group is None:
            raise ValueError(f"{world} replicas need the process group they reduce over.")
        self.parameters = list(parameters)
        if not self.parameters:
            raise ValueError("the offloaded optimizer got no parameters; check which parameters the stage trains.")
        self.group, self.rank, self.world, self.tensor_group = group, rank, world, tensor_group
        self.grad_clip = opt.grad_clip
        self.device = local(self.parameters[0]).device
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.sizes = [local(p).numel() for p in self.parameters]
        self.slices = [-(-n // world) for n in self.sizes]  # each replica's elements of each parameter (padded)
        self.sharded = [is_sharded(p) for p in self.parameters]
        self.masters: list[nn.Parameter] = []
        with torch.no_grad():
            for p, n, s in zip(self.parameters, self.sizes, self.slices):
                master = torch.zeros(s, dtype=torch.float32, pin_memory=pin)
                start = min(rank * s, n)
                end = min(start + s, n)
                master[: end - start] = local(p).reshape(-1)[start:end].float().cpu()
                self.masters.append(nn.Parameter(master))
                self.masters[-1].grad = torch.zeros_like(master)
                p.data = p.data.to(dtype)  # the GPU keeps the compute-dtype weight only
        self.optimizer = torch.optim.AdamW(self.masters, lr=opt.lr, weight_decay=opt.weight_decay)

    def set_lr(self, lr: float) -> None:
        """Learning rate of the coming optimizer step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: Tensor, grad_accum: int) -> None:
        """Backpropagate ``loss / grad_accum``; reduce each gradient over the replicas, parameter by parameter
        in a fixed order, add this replica's slice to its float32 host accumulator and free the GPU gradient."""
        (loss / grad_accum).backward()
        with torch.no_grad():
            for p, n, s, master in zip(self.parameters, self.sizes, self.slices, self.masters):
                grad = local(p.grad).reshape(-1) if p.grad is not None else torch.zeros(n, device=self.device, dtype=p.dtype)
                master.grad += self._reduce_scatter(grad, n, s).float().cpu()
                p.grad = None

    def _reduce_scatter(self, flat: Tensor, n: int, s: int) -> Tensor:
        """``flat [n]`` summed over the replicas -> this replica's slice ``[s]`` (zero-padded past ``n``)."""
        if self.world == 1:
            return flat
        padded = torch.nn.functional.pad(flat, (0, s * self.world - n))
        out = torch.empty(s, dtype=flat.dtype, device=flat.device)
        self.group._reduce_scatter_base(out, padded).wait()  # NCCL and gloo
        return out

    def _sum(self, values: Tensor, over_replicas: bool) -> Tensor:
        """``values`` summed over the replicas (``over_replicas``) or over the tensor-parallel ranks, on the
        parameters' device (NCCL takes GPU tensors only); returned on the host."""
        values = values.to(self.device)
        if over_replicas:
            self.group.allreduce([values]).wait()
        else:
            torch.distributed.all_reduce(values, group=self.tensor_group)
        return values.cpu()

    def step(self) -> float:
        """Average the accumulated slices over the replicas, clip by the global norm, update on the host,
        gather the new weights onto the GPU, zero; return the pre-clip gradient norm."""
        grads = [m.grad for m in self.masters]
        for g in grads:
            g.div_(self.world)
        squares = torch.zeros(2, dtype=torch.float64)  # [sharded over tensor-parallel ranks, replicated on them]
        for g, sharded in zip(grads, self.sharded):
            squares[0 if sharded else 1] += g.double().pow(2).sum()
        if self.world > 1:
            squares = self._sum(squares, over_replicas=True)
        if any(self.sharded):
            squares[0] = self._sum(squares[:1], over_replicas=False)[0]
        norm = float(squares.sum().sqrt())
        if self.grad_clip > 0:
            coef = min(1.0, self.grad_clip / (norm + 1e-6))
            for g in grads:
                g.mul_(coef)
        self.optimizer.step()
        for g in grads:
            g.zero_()
        self._gather()
        return norm

    @torch.no_grad()
    def _gather(self) -> None:
        """Every replica's updated slices -> the compute-dtype weights on the GPU."""
        for p, n, master in zip(self.parameters, self.sizes, self.masters):
            local(p).view(-1).copy_(self._all_gather(master, p.dtype)[:n])

    def _all_gather(self, master: Tensor, dtype: torch.dtype) -> Tensor:
        """Every replica's slice ``[s]`` of one parameter, in ``dtype`` on the device -> ``[s × world]``."""
        mine = master.detach().to(self.device, dtype)
        if self.world == 1:
            return mine
        whole = torch.empty(mine.numel() * self.world, dtype=dtype, device=self.device)
        self.group._allgather_base(whole, mine).wait()
        return whole

    @torch.no_grad()
    def master_weights(self) -> list[Tensor]:
        """Each parameter's float32 master, local part (``local(p).shape``), gathered from every replica
        onto the host: what a checkpoint saves (every replica must call it)."""
        return [
            self._all_gather(master, torch.float32)[:n].view(local(p).shape).cpu()
            for p, n, master in zip(self.parameters, self.sizes, self.masters)
        ]
