"""Training-loop pieces: the cosine schedule, seeded batch order, step counts."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from vlsi_ray.config import OptimConfig
from vlsi_ray.data.order import BatchOrder, order_keys, padding_fraction
from vlsi_ray.method.loop import cosine_lr, total_optimizer_steps, train_stage
from vlsi_ray.method.steps import StepOutput


def test_cosine_schedule_endpoints_and_midpoint():
    opt = OptimConfig(lr=1e-4, min_lr=1e-6)
    assert cosine_lr(0, 11, opt) == pytest.approx(1e-4)
    assert cosine_lr(10, 11, opt) == pytest.approx(1e-6)
    assert cosine_lr(5, 11, opt) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))


def test_warmup_is_linear():
    opt = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=4)
    assert [cosine_lr(s, 20, opt) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_total_steps_from_epochs():
    assert total_optimizer_steps(OptimConfig(batch_size=4, grad_accum=16, epochs=2.0), 640) == 20
    assert total_optimizer_steps(OptimConfig(max_steps=7), 640) == 7


def test_batch_order_is_seeded_and_covers_each_epoch_once():
    ids = [f"row-{i}" for i in range(10)]
    first = BatchOrder(ids, 3, seed=5)
    batches = [b for b, _ in zip(first, range(6))]
    again = [b for b, _ in zip(BatchOrder(ids, 3, seed=5), range(6))]
    assert batches == again
    epoch0 = sum(batches[:3], [])
    assert len(set(epoch0)) == 9 and set(epoch0) <= set(range(10))
    assert batches[:3] != batches[3:]  # reshuffled each epoch
    other = [b for b, _ in zip(BatchOrder(ids, 3, seed=6), range(3))]
    assert other != batches[:3]
    resumed = BatchOrder(ids, 3, seed=5, position=4)
    assert next(iter(resumed)) == batches[4]


def test_epoch_order_depends_only_on_ids_seed_and_epoch():
    ids = [f"row-{i}" for i in range(50)]
    keys = order_keys(ids, seed=3, epoch=1)
    assert keys.dtype == np.int64 and keys.min() >= 0 and len(set(keys.tolist())) == 50
    # The same id gets the same key whatever order or company it comes in (Ray Data blocks).
    shuffled = ids[::-1][:20]
    assert order_keys(shuffled, 3, 1).tolist() == [keys[ids.index(i)] for i in shuffled]
    assert order_keys(ids, 3, 2).tolist() != keys.tolist()
    order = next(iter(BatchOrder(ids, 50, seed=3, position=1)))  # one batch per epoch: epoch 1, whole
    assert order == np.argsort(keys, kind="stable").tolist()


def test_train_stage_fits_a_linear_model():
    torch.manual_seed(0)
    rows = [{"id": i, "x": float(i)} for i in range(64)]
    model = nn.Linear(1, 1)

    def collate(batch):
        x = torch.tensor([[r["x"] / 64] for r in batch])
        return {"x": x, "y": 3 * x + 1}

    def objective(batch):
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return StepOutput(loss, {"loss": loss.item()})

    history = train_stage(
        "fit",
        objective,
        list(model.parameters()),
        rows,
        collate,
        OptimConfig(lr=0.1, min_lr=0.01, batch_size=8, grad_accum=2, max_steps=300, log_every=50),
        seed=0,
        device=torch.device("cpu"),
    )
    assert len(history) == 300 and history[-1]["step"] == 300
    assert history[-1]["loss"] < 1e-3 < history[0]["loss"]
    assert model.weight.item() == pytest.approx(3, abs=0.05) and model.bias.item() == pytest.approx(1, abs=0.05)
    assert not math.isnan(history[-1]["grad_norm"])


def test_a_step_counts_its_micro_batches_without_response_tokens(capsys):
    """A micro-batch with no label left (every row's answer cut) is counted in the step's record and trains
    nothing; the others train as usual."""
    model = nn.Linear(1, 1)
    rows = [{"id": i, "x": float(i), "answered": i % 4 != 0} for i in range(8)]

    def collate(batch):
        labels = torch.tensor([[1 if r["answered"] else -100] for r in batch])
        return {"x": torch.tensor([[r["x"]] for r in batch]), "labels": labels}

    def objective(batch):
        kept = batch["labels"][:, 0] != -100
        loss = (model(batch["x"][kept]) ** 2).sum() / max(int(kept.sum()), 1)
        return StepOutput(loss, {"loss": loss.item()})

    history = train_stage(
        "guard", objective, list(model.parameters()), rows, collate,
        OptimConfig(lr=0.1, batch_size=1, grad_accum=4, max_steps=2, log_every=1), seed=0, device=torch.device("cpu"),
    )  # fmt: skip
    assert sum(record.get("empty_batches", 0) for record in history) == 2  # rows 0 and 4, one batch each
    assert all(math.isfinite(record["loss"]) for record in history)
    assert "micro-batch(es) without response tokens trained nothing" in capsys.readouterr().out


def test_length_grouping_cuts_padding_and_keeps_epochs_whole_and_shuffled():
    """A mixed-length set (text-only rows of 30-90 tokens, image rows of 150-700): grouped batches hold rows
    of similar length, so far less of each padded batch is padding; each epoch still trains every row
    once (whole batches) in a seeded order that changes with the seed."""
    rng = np.random.default_rng(0)
    n, batch = 1600, 16
    lengths = np.where(rng.random(n) < 0.3, rng.integers(30, 90, n), rng.integers(150, 700, n)).tolist()
    ids = [f"row-{i}" for i in range(n)]

    def epoch(order: BatchOrder) -> list[list[int]]:
        return [next(it) for it in [iter(order)] for _ in range(order.batches_per_epoch)]

    shuffled = epoch(BatchOrder(ids, batch, seed=1))
    grouped = epoch(BatchOrder(ids, batch, seed=1, lengths=lengths, group_rows=50 * batch))
    before = padding_fraction([[lengths[i] for i in b] for b in shuffled])
    after = padding_fraction([[lengths[i] for i in b] for b in grouped])
    assert before > 0.3 and after < before / 5, (before, after)
    assert sorted(i for b in grouped for i in b) == list(range(n))  # 1600 = 100 whole batches
    other = epoch(BatchOrder(ids, batch, seed=2, lengths=lengths, group_rows=50 * batch))
    assert other != grouped and sorted(i for b in other for i in b) == list(range(n))
    second = [next(it) for it in [iter(BatchOrder(ids, batch, seed=1, lengths=lengths, group_rows=50 * batch, position=100))]]
    assert second[0] != grouped[0]  # epoch 1 reshuffles the groups


def test_padding_fraction_by_hand():
    assert padding_fraction([[4, 2], [3]]) == pytest.approx(1 - 9 / 11)
    assert padding_fraction([]) == 0.0
