"""DeepSpeed ZeRO-2/3 as the student's stepper: the same updates as plain AdamW, exact resume, bfloat16 masters (two Ray Train
workers under ZeRO-2/3 against one process at the same global batch: test_zero_workers.py; on mixed text-only and image
rows: tests/data/test_mixture.py)."""

from __future__ import annotations

import io
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from vlsi_ray.config import OptimConfig
from vlsi_ray.method.loop import Stepper
from vlsi_ray.method.steps import StepOutput
from vlsi_ray.runners.ray.deepspeed import DeepSpeedStepper, deepspeed_config

STEPS = 4


@pytest.fixture(scope="module")
def single_process_group():
    """A one-rank gloo group, as Ray Train sets up for each worker; one per module (DeepSpeed caches its groups)."""
    mp = pytest.MonkeyPatch()
    with socket.socket() as sock:  # a free port: another test session may hold any fixed one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }.items():
        mp.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    mp.undo()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _objective(net: nn.Module):
    def objective(batch: dict) -> StepOutput:
        x = batch["x"]
        return StepOutput(((net(x) - x[:, :3]) ** 2).mean() * 10, {"rows": x.shape[0]})

    return objective


def _train(stepper, net: nn.Module, opt: OptimConfig, steps: range) -> list[float]:
    """Optimizer steps over seeded micro-batches of 4 rows; returns the gradient norms."""
    run = stepper.wrap(_objective(net))
    norms = []
    for step in steps:
        stepper.set_lr(opt.lr / (step + 1))
        gen = torch.Generator().manual_seed(step)
        for _ in range(opt.grad_accum):
            out = run({"x": torch.randn(4, 6, generator=gen)})
            assert out.metrics == {"rows": 4}
            stepper.backward(out.loss, opt.grad_accum)
        norms.append(stepper.step())
    return norms


def _roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load, as the checkpoint files go."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _weights(stepper, net: nn.Module) -> list[torch.Tensor]:
    with stepper.gathered(list(net.parameters())):
        return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stepper_makes_the_same_updates_as_adamw(single_process_group, stage):
    """Same gradient norms and weights as plain AdamW, with accumulation over 2 micro-batches and clipping."""
    opt = OptimConfig(lr=1e-2, min_lr=1e-3, batch_size=4, grad_accum=2, grad_clip=0.5, weight_decay=0.01)
    reference, model = _net(), _net()
    plain = Stepper(list(reference.parameters()), opt)
    zero = DeepSpeedStepper(list(model.parameters()), opt, stage, {"model": model})
    from deepspeed.comm import comm  # noqa: PLC0415 (DeepSpeed loads only for train.deepspeed_stage > 0)

    assert comm.cdb.shm_comm_op is None  # its shared-memory all-reduce was not built: ZeRO uses gloo
    if stage == 3:
        assert all(p.numel() == 0 for p in model.parameters())  # partitioned outside a forward
    expected = _train(plain, reference, opt, range(5))
    assert _train(zero, model, opt, range(5)) == pytest.approx(expected, rel=1e-5)
    for p, q in zip(reference.parameters(), _weights(zero, model)):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stepper_resumes_exactly(single_process_group, stage):
    """Save weights + optimizer state after 2 steps, restore into a fresh engine: steps 3-5 equal the uninterrupted run's."""
    opt = OptimConfig(lr=1e-2, min_lr=1e-3, batch_size=4, grad_accum=2, grad_clip=0.5, weight_decay=0.01)
    model = _net()
    zero = DeepSpeedStepper(list(model.parameters()), opt, stage, {"model": model})
    _train(zero, model, opt, range(2))
    saved_weights, saved_state = _weights(zero, model), _roundtrip(zero.state_dict())
    expected = _train(zero, model, opt, range(2, 5))
    expected_weights = _weights(zero, model)

    restarted = _net()
    fresh = DeepSpeedStepper(list(restarted.parameters()), opt, stage, {"model": restarted})
    with fresh.gathered(list(restarted.parameters()), modify=True), torch.no_grad():
        for p, w in zip(restarted.parameters(), saved_weights):
            p.copy_(w)
    fresh.load_rank_states([saved_state], 0)
    assert _train(fresh, restarted, opt, range(2, 5)) == pytest.approx(expected, rel=1e-6)
    for p, q in zip(expected_weights, _weights(fresh, restarted)):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_in_bfloat16_keeps_float32_masters_and_tracks_adamw(single_process_group, stage):
    """DeepSpeed's bf16 block: the engine's weights are bfloat16, its optimizer holds float32 masters, and
    five steps follow plain AdamW on float32 masters under the same bfloat16 autocast (to bfloat16 rounding:
    the engine runs every op on bfloat16 weights, the reference only the matmuls; gradient norms within 10%)."""
    opt = OptimConfig(lr=1e-2, min_lr=1e-3, batch_size=4, grad_accum=2, grad_clip=0.5)
    assert deepspeed_config(opt, stage, torch.bfloat16)["bf16"] == {"enabled": True} and "bf16" not in deepspeed_config(
        opt, stage
    )
    reference, model = _net(), _net()
    plain = Stepper(list(reference.parameters()), opt, torch.bfloat16)
    zero = DeepSpeedStepper(list(model.parameters()), opt, stage, {"model": model}, dtype=torch.bfloat16)
    with zero.gathered(list(model.parameters())):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    masters = zero.optimizer.single_partition_of_fp32_groups if stage == 2 else zero.optimizer.fp32_partitioned_groups_flat
    assert masters and {m.dtype for m in masters} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _train(plain, reference, opt, range(5))
        norms = _train(zero, model, opt, range(5))
    assert all(torch.isfinite(torch.tensor(norms))) and norms == pytest.approx(expected, rel=0.1)
    for p, q in zip(reference.parameters(), _weights(zero, model)):
        torch.testing.assert_close(q.float(), p.bfloat16().float(), rtol=0.02, atol=0.02)
