"""The offloaded ZeRO-2 optimizer: the same AdamW as :class:`Stepper`, its state split over replicas on the host."""

from __future__ import annotations

import datetime
import socket
import threading

import pytest
import torch
import torch.distributed as dist
from torch import nn

from vlsi_ray.method.loop import OptimConfig, Stepper
from vlsi_ray.method.offload import OffloadStepper

OPT = OptimConfig(lr=5e-2, weight_decay=0.1, grad_clip=0.5, grad_accum=4)


def _model() -> nn.Module:
    torch.manual_seed(0)
    # sizes that do not divide by 2 or 3: the slices are padded
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3, bias=False))


def _micro_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 7, generator=g), torch.randn(6, 3, generator=g)) for _ in range(steps * OPT.grad_accum)]


def _train(model: nn.Module, stepper, batches, steps: int, rank: int = 0, world: int = 1) -> list[float]:
    """``steps`` optimizer steps; this replica takes every ``world``-th micro-batch from ``rank``."""
    norms = []
    accum = OPT.grad_accum // world
    for step in range(steps):
        mine = batches[step * OPT.grad_accum : (step + 1) * OPT.grad_accum][rank::world]
        for x, y in mine:
            stepper.backward(((model(x) - y) ** 2).mean(), accum)
        norms.append(stepper.step())
    return norms


def test_one_replica_updates_as_adamw_with_clipping_does():
    """Weight decay, clipping by the global norm (it clips: norms above 0.5) and AdamW's moments: the weights
    and pre-clip norms equal the plain Stepper's over 5 steps (float32, to 1e-6)."""
    batches = _micro_batches(5)
    reference, model = _model(), _model()
    expected = _train(reference, Stepper(list(reference.parameters()), OPT), batches, 5)
    stepper = OffloadStepper(list(model.parameters()), OPT)
    got = _train(model, stepper, batches, 5)
    assert max(expected) > OPT.grad_clip  # clipping took part
    assert got == pytest.approx(expected, rel=1e-6)
    for p, q, master in zip(model.parameters(), reference.parameters(), stepper.master_weights()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        torch.testing.assert_close(master, q.detach(), rtol=0, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # gradients left the device after each backward
    assert all(m.device.type == "cpu" and m.dtype == torch.float32 for m in stepper.masters)


@pytest.mark.parametrize("world", [2, 3])
def test_replicas_share_the_state_and_train_what_one_process_trains(world):
    """``world`` replicas (threads joined by gloo) each take every ``world``-th micro-batch of a step (12 per
    step, 3 steps): each keeps a 1/world slice of every parameter's state, and all end with the weights one
    process trains on every micro-batch (to 1e-6)."""
    opt = OptimConfig(lr=OPT.lr, weight_decay=OPT.weight_decay, grad_clip=OPT.grad_clip, grad_accum=12)
    batches = [b for b in _micro_batches(9)][:36]
    reference = _model()
    stepper = Stepper(list(reference.parameters()), opt)
    expected = []
    for step in range(3):
        for x, y in batches[step * 12 : (step + 1) * 12]:
            stepper.backward(((reference(x) - y) ** 2).mean(), 12)
        expected.append(stepper.step())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    models = [_model() for _ in range(world)]  # here: the global RNG is not to be shared by threads

    def replica(rank: int) -> None:
        try:
            store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
            group = dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=60))
            model = models[rank]
            offload = OffloadStepper(list(model.parameters()), opt, group=group, rank=rank, world=world)
            norms = []
            for step in range(3):
                for x, y in batches[step * 12 : (step + 1) * 12][rank::world]:
                    offload.backward(((model(x) - y) ** 2).mean(), 12 // world)
                norms.append(offload.step())
            results[rank] = (model, offload, norms, offload.master_weights())
        except BaseException as error:  # surfaced by the test thread
            errors.append(error)

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for rank in range(world):
        model, offload, norms, masters = results[rank]
        assert norms == pytest.approx(expected, rel=1e-6)
        for p, q, master in zip(model.parameters(), reference.parameters(), masters):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
            torch.testing.assert_close(master, q.detach(), rtol=0, atol=1e-6)
        sizes = [p.numel() for p in reference.parameters()]
        assert [m.numel() for m in offload.masters] == [-(-n // world) for n in sizes]  # a slice of each, not all
        state = offload.optimizer.state[offload.masters[0]]
        assert state["exp_avg"].numel() == -(-sizes[0] // world) and state["exp_avg"].device.type == "cpu"


def test_compute_dtype_weights_on_the_device_and_float32_masters_on_the_host():
    """In bfloat16 the device keeps bfloat16 weights only; an update smaller than bfloat16's step still
    moves the float32 master (nothing is lost to rounding)."""
    layer = nn.Linear(4, 4, bias=False)
    nn.init.constant_(layer.weight, 1.0)
    stepper = OffloadStepper([layer.weight], OptimConfig(lr=1e-4, grad_clip=0.0), dtype=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(torch.ones(2, 4)).float().sum()
    stepper.backward(loss, 1)
    stepper.step()
    master = stepper.master_weights()[0]
    assert master.dtype == torch.float32 and torch.allclose(master, torch.full((4, 4), 1.0 - 1e-4), atol=1e-7)
    assert torch.equal(layer.weight, torch.ones(4, 4, dtype=torch.bfloat16))  # 1 - 1e-4 rounds to 1 in bfloat16


def test_refuses_float16_and_a_missing_group():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no float16 loss scaling; train the teacher in bfloat16"):
        OffloadStepper(list(layer.parameters()), OPT, dtype=torch.float16)
    with pytest.raises(ValueError, match="2 replicas need the process group"):
        OffloadStepper(list(layer.parameters()), OPT, world=2)
