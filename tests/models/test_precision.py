"""Mixed precision and memory features: compute dtypes, float32 masters, float16 loss scaling, saving in the
base checkpoint's dtype, gradient checkpointing (same losses and gradients) and attention kernels."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from vlsi_ray.config import OptimConfig
from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.data.synthetic import corpus_texts, generate_rows
from vlsi_ray.method.loop import Stepper
from vlsi_ray.method.matching import MatchingOptions
from vlsi_ray.method.steps import SFT_GROUPS, InteractionObjective, SFTObjective, VerbalizationObjective
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.models.precision import autocast, compute_dtype, keep_float32_masters, parse_dtype, round_to_dtype
from vlsi_ray.models.qwen2_vl import build_tiny
from vlsi_ray.models.tokenizer import train_tokenizer
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.prepare import LoadSettings, load_model
from vlsi_ray.signals.produce import teacher_signal

FAMILY = "qwen2_vl"
SIZES = dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, vision_embed_dim=32, vision_depth=1, seed=2)


@pytest.fixture(scope="module")
def base(one_thread):
    rows = generate_rows("train", 24, seed=0)
    tokenizer = train_tokenizer(corpus_texts(rows), FAMILY)
    model = build_tiny("student", tokenizer, **SIZES)
    batch = ChatCollator(tokenizer, model.image_processor, FAMILY)(rows[:6])
    return tokenizer, model, batch


def fresh(model: Backbone, dtype: torch.dtype = torch.float32) -> Backbone:
    copied = copy.deepcopy(model.model).to(dtype)
    return Backbone(model.family, copied, model.tokenizer, model.image_processor, model.name)


def test_compute_dtype_resolution():
    assert compute_dtype("auto", "cpu", torch.bfloat16) == torch.bfloat16  # a bf16 release computes in bf16 on CPU
    assert compute_dtype("auto", "cpu", None) == torch.float32  # a tiny model built in memory
    assert compute_dtype(None, torch.device("cpu"), torch.float16) == torch.float16
    assert compute_dtype("float32", "cpu", torch.bfloat16) == torch.float32
    assert parse_dtype("bf16") == torch.bfloat16 and parse_dtype("fp32") == torch.float32 and parse_dtype(None) is None
    with pytest.raises(ValueError, match="not one of bfloat16, float16, float32"):
        parse_dtype("int8")
    assert isinstance(autocast("cpu", torch.float32), type(autocast("cpu", torch.float32)))  # a no-op context in float32
    with autocast("cpu", torch.bfloat16):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16


def test_masters_are_float32_and_round_back(base):
    _, model, _ = base
    layer = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert keep_float32_masters(layer.parameters()) == 2 and layer.weight.dtype == torch.float32
    assert keep_float32_masters(layer.parameters()) == 0
    round_to_dtype(layer, torch.bfloat16)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}


def test_objectives_train_float32_masters_of_a_bfloat16_model(base):
    """SFT (step 3) on a bfloat16 model: the trained groups become float32 masters, frozen ones stay
    bfloat16, the loss is float32 and finite, and an AdamW step changes the masters."""
    _, model, batch = base
    backbone = fresh(model, torch.bfloat16)
    objective = SFTObjective(backbone, SFT_GROUPS)
    groups = backbone.parameter_groups()
    assert all(p.dtype == torch.float32 and p.requires_grad for g in SFT_GROUPS for _, p in groups[g])
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for _, p in groups["vision"])
    assert objective.compute_dtype == torch.bfloat16
    stepper = Stepper(objective.parameters(), OptimConfig(lr=1e-3), objective.compute_dtype)
    head = backbone.lm_head.weight.detach().clone()
    out = objective(batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    stepper.backward(out.loss, 1)
    assert backbone.lm_head.weight.grad.dtype == torch.float32
    stepper.step()
    assert not torch.equal(head, backbone.lm_head.weight)
    backbone.round_to_compute_dtype()
    assert {p.dtype for p in backbone.model.parameters()} == {torch.bfloat16}

    verbs = Verbalizers(backbone.hidden_size, [1, 2]).to(torch.bfloat16)
    VerbalizationObjective(backbone, verbs)
    assert {p.dtype for p in verbs.parameters()} == {torch.float32}


def test_stepper_refuses_low_precision_weights_and_scales_float16_losses(base):
    """AdamW never updates a bfloat16 weight; float16 adds loss scaling, whose overflow skips the step."""
    with pytest.raises(ValueError, match="keep float32 master weights"):
        Stepper([torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))], OptimConfig())
    weight = torch.nn.Parameter(torch.ones(3))
    stepper = Stepper([weight], OptimConfig(lr=0.1, grad_clip=0), torch.float16)
    assert stepper.scaler is not None
    stepper.backward((weight * 2).sum(), 1)
    assert torch.allclose(weight.grad, torch.full((3,), 2.0 * stepper.scaler.get_scale()))
    assert stepper.step() == pytest.approx(2 * 3**0.5, rel=1e-5)  # unscaled before clipping and the update
    assert not torch.equal(weight.detach(), torch.ones(3))
    updated = weight.detach().clone()
    scale = stepper.scaler.get_scale()
    stepper.backward((weight * float("inf")).sum(), 1)
    assert not torch.isfinite(torch.tensor(stepper.step()))
    assert torch.equal(weight.detach(), updated) and stepper.scaler.get_scale() < scale  # skipped, scale backed off
    state = stepper.state_dict()
    again = Stepper([torch.nn.Parameter(updated.clone())], OptimConfig(lr=0.1, grad_clip=0), torch.float16)
    again.load_rank_states([state], 0)
    assert again.scaler.get_scale() == stepper.scaler.get_scale()


def test_save_writes_the_base_checkpoints_dtype(base, tmp_path):
    """A bfloat16 checkpoint loaded in float32 (student.dtype=float32) is saved back in bfloat16 by default,
    in float32 when asked; the model in memory is left as it is."""
    _, model, _ = base
    fresh(model, torch.bfloat16).save_pretrained(tmp_path / "bf16")
    wide = load_model(tmp_path / "bf16", LoadSettings(dtype="float32"), "cpu")
    assert wide.compute_dtype == torch.float32 and wide.checkpoint_dtype == torch.bfloat16
    wide.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["dtype"] == "bfloat16"
    assert Backbone.from_pretrained(tmp_path / "again").compute_dtype == torch.bfloat16
    assert {p.dtype for p in wide.model.parameters()} == {torch.float32}
    wide.save_pretrained(tmp_path / "fp32", dtype="float32")
    assert Backbone.from_pretrained(tmp_path / "fp32").compute_dtype == torch.float32


def _grads(parameters) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in parameters]


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(base):
    """Step 3 (full LLM) and step 2 (LoRA, the inputs never require grad): identical losses and
    gradients with checkpointing on and off, and checkpointing really recomputes (fewer saved tensors)."""
    _, model, batch = base
    results = {}
    for enabled in (False, True):
        backbone = fresh(model)
        backbone.set_gradient_checkpointing(enabled)
        backbone.model.train()
        objective = SFTObjective(backbone, SFT_GROUPS)
        saved: list[int] = []

        def count(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            loss = objective(batch).loss
        loss.backward()
        results[enabled] = (loss.item(), _grads(objective.parameters()), sum(saved))
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    for on, off in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-7)
    assert results[True][2] < 0.7 * results[False][2]

    teacher = fresh(model)
    t_verbs = Verbalizers(teacher.hidden_size, [1, 2])
    signal = teacher_signal(teacher, t_verbs, batch, topk=None)
    lora = {}
    for enabled in (False, True):
        student = fresh(model)
        student.set_gradient_checkpointing(enabled)
        torch.manual_seed(0)
        student.apply_lora(4, 8)
        student.model.train()
        s_verbs = Verbalizers(student.hidden_size, [1, 2])
        objective = InteractionObjective(
            student, s_verbs, lambda b: signal, MatchingOptions(strategy="uniform"), generator=torch.Generator().manual_seed(0)
        )
        for name, p in student.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        loss = objective(batch).loss
        loss.backward()
        lora[enabled] = (loss.item(), _grads(objective.parameters()))
        adapters = [p.grad for name, p in student.model.named_parameters() if "lora_" in name]
        assert adapters and all(g.abs().sum() > 0 for g in adapters)  # gradients reach LoRA through recomputed blocks
    assert lora[True][0] == pytest.approx(lora[False][0], rel=1e-6)
    for on, off in zip(lora[True][1], lora[False][1]):
        torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-7)


def test_attention_implementations_agree_and_flash_attention_is_refused_clearly(base, tmp_path):
    _, model, batch = base
    model.save_pretrained(tmp_path / "m")
    logits = {}
    for kernel in ("sdpa", "eager"):
        loaded = load_model(tmp_path / "m", LoadSettings(attn_implementation=kernel), "cpu")
        assert loaded.model.config._attn_implementation == kernel
        with torch.no_grad():
            logits[kernel] = loaded.forward(batch).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="student.attn_implementation=flash_attention_2 needs CUDA and the flash-attn package"):
        load_model(tmp_path / "m", LoadSettings(attn_implementation="flash_attention_2"), "cpu")
    fallback = load_model(tmp_path / "m", LoadSettings(attn_implementation="auto"), "cpu")  # no CUDA here: sdpa
    assert fallback.model.config._attn_implementation == "sdpa"
