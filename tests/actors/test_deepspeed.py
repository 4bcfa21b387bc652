"""DeepSpeed ZeRO-2 as the student's stepper: the same updates as plain AdamW, and two Ray Train workers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from vlsi_ray.config import OptimConfig, load_config
from vlsi_ray.method.loop import Stepper
from vlsi_ray.metrics import read_metrics

from tiny_config import make_tiny_overrides

STEPS = 4


@pytest.fixture
def single_process_group(monkeypatch):
    """A one-rank gloo group, as Ray Train sets up for each worker."""
    import torch.distributed as dist

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_zero2_stepper_makes_the_same_updates_as_adamw(single_process_group):
    from vlsi_ray.actors.deepspeed import DeepSpeedStepper

    opt = OptimConfig(lr=1e-2, min_lr=1e-3, batch_size=4, grad_accum=2, grad_clip=0.5, weight_decay=0.01)
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model.load_state_dict(reference.state_dict())
    plain = Stepper(list(reference.parameters()), opt)
    zero = DeepSpeedStepper(list(model.parameters()), opt, 2, nn.ModuleDict({"model": model}))
    for step in range(5):
        for stepper, net in ((plain, reference), (zero, model)):
            stepper.set_lr(opt.lr / (step + 1))
        norms = []
        for stepper, net in ((plain, reference), (zero, model)):
            gen = torch.Generator().manual_seed(step)
            for _ in range(opt.grad_accum):
                x = torch.randn(4, 6, generator=gen)
                stepper.backward(((net(x) - x[:, :3]) ** 2).mean() * 10, opt.grad_accum)
            norms.append(stepper.step())
        assert norms[1] == pytest.approx(norms[0], rel=1e-5)
        for p, q in zip(reference.parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_two_workers_with_zero2_shard_the_data_and_train(local_ray, tmp_path):
    from vlsi_ray.ray_runner import run_ray

    cfg = load_config(None, make_tiny_overrides(tmp_path, "zero2", {"interact": STEPS}) + [
        "steps=[interact]", "baseline_sft=false", "train.use_gpu=false", "train.num_workers=2",
        "train.deepspeed_stage=2", "train.log_ids=true", "train.checkpoint_every=0"])
    run_ray(cfg)
    records = list(read_metrics(cfg.run_dir / "metrics.jsonl", "interact"))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in records)  # no NaN
    ids = [[i for line in (cfg.run_dir / "interact" / f"consumed_ids.interact.rank{r}.jsonl").read_text().splitlines()
            for i in json.loads(line)] for r in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == STEPS * 8
    assert not set(ids[0]) & set(ids[1])  # each worker trains on its own shard of every global batch
    assert os.path.isfile(cfg.run_dir / "interact" / "student" / "config.json")
