"""Step objectives on tiny Qwen2-VL models: which parameters each step trains, the teacher signal,
the interaction loss against a hand reference, and the matching constraints."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import Counter

import pytest
import torch

from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.data.synthetic import corpus_texts, generate_rows
from vlsi_ray.method.losses import per_token_kl
from vlsi_ray.method.matching import MatchingOptions, band_mask
from vlsi_ray.method.steps import (
    SFT_GROUPS,
    InteractionObjective,
    LossOptions,
    SFTObjective,
    VerbalizationObjective,
    at_index,
    model_inputs,
    response_index,
    response_positions,
)
from vlsi_ray.models.backbone import LM_LORA_TARGETS, Backbone
from vlsi_ray.models.qwen2_vl import build_tiny
from vlsi_ray.models.tokenizer import train_tokenizer
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.profiling import HostWaits
from vlsi_ray.signals.produce import teacher_signal
from vlsi_ray.signals.teacher_signal import TeacherSignal, tail_sample_generator

FAMILY = "qwen2_vl"
TEACHER_SIZES = dict(
    hidden_size=64, num_layers=5, num_heads=4, intermediate_size=128, vision_embed_dim=32, vision_depth=1, seed=1
)
STUDENT_SIZES = dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, vision_embed_dim=32, vision_depth=1, seed=2)
TEACHER_LAYERS = [1, 2, 3, 4]  # t_l = 4 (block 5 is the final layer)
STUDENT_LAYERS = [1, 2]  # t_s = 2
LORA_RANK = 4
#: A full-match regex over the peft-free parameter names of the LoRA-targeted projection weights.
LORA_TARGET_WEIGHT = re.compile(LM_LORA_TARGETS + r"\.weight")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(one_thread):
    """Tokenizer, pristine teacher/student, and one collated batch of 8 synthetic rows."""
    rows = generate_rows("train", 48, seed=0)
    tokenizer = train_tokenizer(corpus_texts(rows), FAMILY)
    teacher = build_tiny("teacher", tokenizer, **TEACHER_SIZES)
    student = build_tiny("student", tokenizer, **STUDENT_SIZES)
    assert teacher.vocab_size == student.vocab_size
    batch = ChatCollator(tokenizer, student.image_processor, FAMILY)(rows[:8])
    return tokenizer, teacher, student, batch


def _copy(backbone: Backbone) -> Backbone:
    return Backbone(backbone.family, copy.deepcopy(backbone.model), backbone.tokenizer, backbone.image_processor, backbone.name)


def _verbalizers(backbone: Backbone, layers, seed: int, zero_init: bool = True) -> Verbalizers:
    torch.manual_seed(seed)
    return Verbalizers(backbone.hidden_size, layers, residual=True, zero_init=zero_init, final_norm=True)


@pytest.fixture
def setup(base):
    """Fresh copies per test (objectives flip requires_grad and optimizers change weights)."""
    tokenizer, teacher, student, batch = base
    teacher, student = _copy(teacher), _copy(student)
    t_verbs = _verbalizers(teacher, TEACHER_LAYERS, seed=3)
    s_verbs = _verbalizers(student, STUDENT_LAYERS, seed=4)
    return teacher, student, t_verbs, s_verbs, batch


# ------------------------------------------------------------------------------------------ helpers
def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A clone of every tensor (parameters and buffers) of ``module``."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(before: dict, module: torch.nn.Module) -> list[str]:
    after = module.state_dict()
    assert after.keys() == before.keys()
    return [k for k in before if torch.equal(before[k], after[k])]


def changed(before: dict, module: torch.nn.Module) -> list[str]:
    after = module.state_dict()
    assert after.keys() == before.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


def optimize(objective, batch: dict, steps: int = 1) -> list:
    """``steps`` AdamW steps (lr 1e-2, no weight decay, so only a gradient can move a weight)."""
    params = objective.parameters()
    assert params, "objective has no trainable parameters"
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    outs = []
    for _ in range(steps):
        out = objective(batch)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        outs.append(out)
    return outs


def group_of(backbone: Backbone, name: str) -> str:
    return next(g for prefix, g in backbone.spec.group_prefixes if name.startswith(prefix))


def param_names(module: torch.nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters()}


def top16_interaction(teacher: Backbone, t_verbs: Verbalizers, student: Backbone, s_verbs: Verbalizers) -> InteractionObjective:
    """Step 2 with the teacher's top-16 signal over the shared vocabulary, default matching, seeded."""
    vocab = teacher.vocab_size
    return InteractionObjective(
        student,
        s_verbs,
        lambda b: teacher_signal(teacher, t_verbs, b, 16, vocab_size=vocab),
        MatchingOptions(),
        generator=torch.Generator().manual_seed(0),
        vocab_size=vocab,
    )


# ------------------------------------------------------------------------------------------ response positions
def test_response_positions_on_hand_made_labels():
    labels = torch.tensor([
        [-100, -100, 5, 6, -100],   # response in the middle
        [-100, 7, -100, -100, -100],  # one-token response
        [3, -100, -100, 8, 9],      # label at position 0 cannot be predicted; response runs to the end
        [-100, -100, -100, -100, -100],  # no response
    ])  # fmt: skip
    mask, targets = response_positions(labels)
    expected = torch.tensor([
        [False, True, True, False, False],
        [True, False, False, False, False],
        [False, False, True, True, False],
        [False, False, False, False, False],
    ])  # fmt: skip
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    assert targets.dtype == torch.int64 and targets.tolist() == [5, 6, 7, 8, 9]
    # x[mask] orders positions as the targets: position t predicts labels[t + 1].
    nxt = labels.roll(-1, dims=1)
    assert torch.equal(nxt[mask], targets)
    # the same positions as flat indices into B × T, and the same targets
    index, flat_targets = response_index(labels)
    assert index.tolist() == [1, 2, 5, 12, 13] and torch.equal(flat_targets, targets)
    hidden = torch.arange(4 * 5 * 2).reshape(4, 5, 2)
    assert torch.equal(at_index(hidden, index, hidden.device), hidden[mask])


def test_response_positions_on_the_collated_batch(base):
    _, _, _, batch = base
    mask, targets = response_positions(batch["labels"])
    labels = batch["labels"]
    assert targets.numel() == int((labels[:, 1:] != -100).sum()) > 0
    assert not mask[:, -1].any()
    # Every response token is one of the assistant tokens (the letter + <|im_end|>).
    assert set(targets.tolist()) <= set(labels[labels != -100].tolist())


# ------------------------------------------------------------------------------------------ trainable sets
def test_sft_all_groups_trains_every_parameter(setup):
    teacher, student, t_verbs, s_verbs, batch = setup
    before = {m: snapshot(m) for m in (teacher.model, student.model, t_verbs, s_verbs)}
    objective = SFTObjective(student)
    assert {id(p) for p in objective.parameters()} == {id(p) for p in student.model.parameters()}
    optimize(objective, batch, steps=1)
    for m in (teacher.model, t_verbs, s_verbs):
        assert not changed(before[m], m)
    params = param_names(student.model)
    still = [k for k in unchanged(before[student.model], student.model) if k in params]
    assert not still, f"SFT left parameters untouched: {still}"


def test_sft_groups_leave_the_vision_tower_bit_identical(setup):
    teacher, student, t_verbs, s_verbs, batch = setup
    before = {m: snapshot(m) for m in (teacher.model, student.model, t_verbs, s_verbs)}
    objective = SFTObjective(student, SFT_GROUPS)
    optimize(objective, batch, steps=1)
    for m in (teacher.model, t_verbs, s_verbs):
        assert not changed(before[m], m)
    params = param_names(student.model)
    moved = set(changed(before[student.model], student.model))
    vision = {n for n in params if group_of(student, n) == "vision"}
    assert vision and not (vision & moved), "SFT_GROUPS moved the vision tower"
    trained = params - vision
    assert trained == {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert not trained - moved, f"SFT_GROUPS left parameters untouched: {sorted(trained - moved)}"
    assert any(group_of(student, n) == "projector" for n in moved)


def test_sft_through_lora_trains_only_the_adapters(setup):
    teacher, student, t_verbs, s_verbs, batch = setup
    student.apply_lora(LORA_RANK, LORA_RANK)
    before = snapshot(student.model)
    objective = SFTObjective(student, SFT_GROUPS)
    lora_keys = {k for k in before if "lora_" in k}
    assert {id(p) for p in objective.parameters()} == {id(p) for n, p in student.model.named_parameters() if "lora_" in n}
    optimize(objective, batch, steps=2)
    assert set(changed(before, student.model)) == lora_keys


def test_interaction_refuses_a_student_without_lora(setup):
    teacher, student, t_verbs, s_verbs, batch = setup
    with pytest.raises(ValueError, match="apply_lora"):
        InteractionObjective(student, s_verbs, lambda b: None, MatchingOptions(), generator=torch.Generator())


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_verbalization_trains_only_its_verb_ffns(setup, role):
    teacher, student, t_verbs, s_verbs, batch = setup
    backbone, verbs = (teacher, t_verbs) if role == "teacher" else (student, s_verbs)
    others = [m for m in (teacher.model, student.model, t_verbs, s_verbs) if m is not verbs]
    before = {m: snapshot(m) for m in (*others, verbs)}
    objective = VerbalizationObjective(backbone, verbs)
    assert {id(p) for p in objective.parameters()} == {id(p) for p in verbs.parameters()}

    out = optimize(objective, batch, steps=1)[0]
    assert set(out.metrics) == {"loss"} | {f"ce/{layer}" for layer in verbs.layers}
    assert out.metrics["loss"] == pytest.approx(sum(out.metrics[f"ce/{layer}"] for layer in verbs.layers), rel=1e-5)
    for m in others:  # both backbones (LM heads and final norms included) and the other verbalizers
        assert not changed(before[m], m)
    # Zero-initialised down projections: step 1 moves only `down` (gate/up get exactly zero gradient).
    moved = set(changed(before[verbs], verbs))
    assert moved == {f"ffns.{layer}.down.weight" for layer in verbs.layers}

    optimize(objective, batch, steps=1)
    for m in others:
        assert not changed(before[m], m)
    assert set(changed(before[verbs], verbs)) == set(before[verbs])  # gate, up and down of every verb-FFN


def test_candidate_distances_equal_a_kl_per_pair(setup):
    """The matching's distance matrix (one vocabulary normalisation per student layer and chunk, shared by the
    candidates) equals one per_token_kl per (student layer, teacher layer) pair of the band, to 1e-6; inf outside."""
    teacher, student, t_verbs, s_verbs, batch = setup
    student.apply_lora(LORA_RANK, LORA_RANK)
    objective = top16_interaction(teacher, t_verbs, student, s_verbs)
    objective.loss = dataclasses.replace(objective.loss, chunk_size=5)  # several chunks per layer
    signal = objective.teacher(batch)
    with torch.no_grad():
        step = objective._student_side(batch, signal)
        distances = objective._candidate_distances(step.hidden, step.heads, signal)
        band = band_mask(len(step.hidden), signal.num_layers - 1, objective.options)
        for i, (hidden, head) in enumerate(zip(step.hidden, step.heads)):
            logits = head(hidden)
            for j in range(signal.num_layers - 1):
                if band[i, j]:
                    expected = per_token_kl(signal.layer(j), logits).mean().item()
                    assert distances[i, j].item() == pytest.approx(expected, abs=1e-6), (i, j)
                else:
                    assert distances[i, j].item() == float("inf")
    assert band.sum() > len(step.hidden)  # some student layer had several candidates


def test_interaction_trains_lora_and_student_verbalizers_only(setup, base):
    teacher, student, t_verbs, s_verbs, batch = setup
    pre_lora = snapshot(student.model)
    student.apply_lora(LORA_RANK, LORA_RANK)
    before = {m: snapshot(m) for m in (teacher.model, student.model, t_verbs, s_verbs)}
    objective = top16_interaction(teacher, t_verbs, student, s_verbs)
    trained = {id(p) for p in objective.parameters()}
    lora = {n: p for n, p in student.model.named_parameters() if "lora_" in n}
    assert lora and trained == {id(p) for p in lora.values()} | {id(p) for p in s_verbs.parameters()}
    for group in ("vision", "projector", "embeddings", "head"):
        assert not any(p.requires_grad for _, p in student.parameter_groups()[group])

    optimize(objective, batch, steps=2)  # B is zero-initialised: A moves from the second step on
    assert not changed(before[teacher.model], teacher.model)
    assert not changed(before[t_verbs], t_verbs)
    moved = set(changed(before[student.model], student.model))
    lora_keys = {k for k in before[student.model] if "lora_" in k}
    assert {k for k in lora_keys if "lora_A" in k} and {k for k in lora_keys if "lora_B" in k}
    assert moved == lora_keys, f"base weights moved: {sorted(moved - lora_keys)}; LoRA untouched: {sorted(lora_keys - moved)}"
    assert set(changed(before[s_verbs], s_verbs)) == set(before[s_verbs])

    # Merging folds LoRA into exactly the projections it targets; everything else is the pre-LoRA tensor.
    student.merge_lora()
    after = student.model.state_dict()
    assert after.keys() == pre_lora.keys()
    targeted = {k for k in pre_lora if LORA_TARGET_WEIGHT.fullmatch(k)}
    assert len(targeted) == 7 * STUDENT_SIZES["num_layers"]
    differ = {k for k in pre_lora if not torch.equal(pre_lora[k], after[k])}
    assert differ == targeted


# ------------------------------------------------------------------------------------------ teacher signal
@pytest.mark.parametrize("topk", [None, 16])
def test_teacher_signal_shapes_and_last_layer(setup, topk):
    teacher, _, t_verbs, _, batch = setup
    mask, targets = response_positions(batch["labels"])
    signal = teacher_signal(teacher, t_verbs, batch, topk)
    assert signal.num_layers == len(TEACHER_LAYERS) + 1
    assert signal.num_tokens == targets.numel() == int(mask.sum())
    assert signal.vocab_size == teacher.vocab_size
    logits = teacher.forward(model_inputs(batch)).logits.detach()
    expected = torch.log_softmax(logits[mask].float(), dim=-1)
    if topk is None:
        assert signal.is_dense
        assert signal.logprobs.shape == (len(TEACHER_LAYERS) + 1, targets.numel(), teacher.vocab_size)
        torch.testing.assert_close(signal.logprobs[-1], expected, atol=1e-5, rtol=1e-5)
    else:
        assert signal.k == topk
        assert signal.topk_logprobs.shape == signal.topk_ids.shape == (len(TEACHER_LAYERS) + 1, targets.numel(), topk)
        assert signal.tail_logmass.shape == (len(TEACHER_LAYERS) + 1, targets.numel())
        torch.testing.assert_close(signal.topk_logprobs[-1], expected.gather(-1, signal.topk_ids[-1]), atol=1e-5, rtol=1e-5)


def test_teacher_signal_tail_samples_belong_to_rows_not_batches(base, setup):
    """Each row's tail samples come from its own id: the same in any batch order (what the teacher cache relies on)."""
    tokenizer, _, student, _ = base
    teacher, _, t_verbs, _, _ = setup
    rows = generate_rows("train", 2, seed=5)
    collate = ChatCollator(tokenizer, student.image_processor, FAMILY)
    forward = teacher_signal(teacher, t_verbs, collate(rows), 16, tail_samples=8, seed=3)
    backward = teacher_signal(teacher, t_verbs, collate(rows[::-1]), 16, tail_samples=8, seed=3)
    n0 = int((collate(rows[:1])["labels"] != -100).sum())  # row 0's response tokens: first in one batch, last in the other
    assert torch.equal(forward.tail_sample_ids[:, :n0], backward.tail_sample_ids[:, -n0:])
    assert torch.equal(forward.tail_sample_ids[:, n0:], backward.tail_sample_ids[:, :-n0])
    other_seed = teacher_signal(teacher, t_verbs, collate(rows), 16, tail_samples=8, seed=4)
    assert not torch.equal(other_seed.tail_sample_ids, forward.tail_sample_ids)


@pytest.mark.parametrize("topk,tail_samples", [(None, 0), (16, 0), (16, 8)], ids=["dense", "top-k", "top-k + draws"])
def test_teacher_signal_layer_by_layer_equals_all_layers_at_once(setup, topk, tail_samples):
    """The signal taken as each head runs is the one built from every layer's logits stacked first (the memory-
    hungry way: ``[t_l + 1, N, V]``), tail draws included (each row's generator runs through the layers in order)."""
    teacher, _, t_verbs, _, batch = setup
    batch = dict(batch, ids=[f"row-{i}" for i in range(batch["labels"].shape[0])])
    signal = teacher_signal(teacher, t_verbs, batch, topk, tail_samples=tail_samples, seed=3)
    with torch.no_grad():
        out = teacher.forward(model_inputs(batch), logits=False)
        mask, _ = response_positions(batch["labels"])
        heads = [t_verbs.head(layer, teacher.final_norm, teacher.lm_head) for layer in t_verbs.layers]
        hidden = [out.hidden_states[layer][mask] for layer in t_verbs.layers]
        logits = torch.stack(
            [h(x).float() for h, x in zip(heads, hidden)] + [teacher.lm_head(out.hidden_states[-1][mask]).float()]
        )
    if tail_samples:
        ends = mask.sum(dim=1).cumsum(0).tolist()
        reference = TeacherSignal.cat_tokens([
            TeacherSignal.from_logits(logits[:, a:b], topk, 1.0, tail_samples, tail_sample_generator(3, [i], logits.device))
            for i, a, b in zip(batch["ids"], [0] + ends[:-1], ends)
        ])  # fmt: skip
    else:
        reference = TeacherSignal.from_logits(logits, topk)
    for name, tensor in reference._named_tensors().items():
        assert (tensor is None) == (getattr(signal, name) is None), name
        if tensor is not None:
            torch.testing.assert_close(getattr(signal, name), tensor, rtol=0, atol=0, msg=name)
    assert signal.num_layers == len(TEACHER_LAYERS) + 1


def test_teacher_signal_vocab_prefix(setup):
    teacher, _, t_verbs, _, batch = setup
    signal = teacher_signal(teacher, t_verbs, batch, None, vocab_size=teacher.vocab_size - 64)
    assert signal.vocab_size == teacher.vocab_size - 64
    torch.testing.assert_close(signal.logprobs.exp().sum(-1), torch.ones(signal.logprobs.shape[:2]), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ interaction loss
def _reference_loss(teacher, student, t_verbs, s_verbs, batch, pairs, vocab) -> float:
    """Forward KL(teacher ‖ student), float64, mean over response tokens, summed over pairs + last layer."""

    def kl(t_logits, s_logits):
        p = torch.log_softmax(t_logits[:, :vocab].double(), dim=-1)
        q = torch.log_softmax(s_logits[:, :vocab].double(), dim=-1)
        return (p.exp() * (p - q)).sum(-1).mean()

    with torch.no_grad():
        mask, _ = response_positions(batch["labels"])
        out_t = teacher.forward(model_inputs(batch))
        out_s = student.forward(model_inputs(batch))
        total = torch.zeros((), dtype=torch.float64)
        for s_layer, t_layer in pairs:
            t_head = t_verbs.head(t_layer, teacher.final_norm, teacher.lm_head)
            s_head = s_verbs.head(s_layer, student.final_norm, student.lm_head)
            total += kl(t_head(out_t.hidden_states[t_layer][mask]), s_head(out_s.hidden_states[s_layer][mask]))
        total += kl(out_t.logits[mask], out_s.logits[mask])
    return float(total)


def test_interaction_loss_matches_a_hand_reference(setup):
    teacher, student, _, _, batch = setup
    vocab = teacher.vocab_size
    # Non-zero down projections, so the verbalizers are not just the logit lens.
    t_verbs = _verbalizers(teacher, TEACHER_LAYERS, seed=5, zero_init=False)
    s_verbs = _verbalizers(student, STUDENT_LAYERS, seed=6, zero_init=False)
    student.apply_lora(LORA_RANK, LORA_RANK)  # B = 0: outputs unchanged
    objective = InteractionObjective(
        student,
        s_verbs,
        lambda b: teacher_signal(teacher, t_verbs, b, None, vocab_size=vocab),
        MatchingOptions(strategy="uniform"),
        generator=torch.Generator().manual_seed(0),
        vocab_size=vocab,
    )
    out = objective(batch)
    # uniform: i_l = i_s·floor(t_l/t_s) (1-based) -> student target 1 ↔ teacher target 2, 2 ↔ 4.
    assert out.metrics["matched"] == [[1], [3]]
    pairs = [(STUDENT_LAYERS[0], TEACHER_LAYERS[1]), (STUDENT_LAYERS[1], TEACHER_LAYERS[3])]
    expected = _reference_loss(teacher, student, t_verbs, s_verbs, batch, pairs, vocab)
    assert expected > 0.01  # different random models disagree: the check is not vacuous
    assert out.loss.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)
    assert out.metrics["loss"] == pytest.approx(expected, abs=1e-5, rel=1e-5)
    assert out.metrics["loss"] == pytest.approx(
        out.metrics[f"kl/{STUDENT_LAYERS[0]}"] + out.metrics[f"kl/{STUDENT_LAYERS[1]}"] + out.metrics["kl/last"], rel=1e-5
    )
    out.loss.backward()  # the loss is differentiable w.r.t. the student side
    assert all(p.grad is not None for p in s_verbs.parameters())


@pytest.mark.parametrize("intermediate", ["ce", "none"])
def test_interaction_ablation_losses_match_a_hand_reference(setup, intermediate):
    """Table 4(d)/(b)'s step-2 variants: ground-truth CE on the student's verbalized layers, or none."""
    teacher, student, _, _, batch = setup
    vocab = teacher.vocab_size
    t_verbs = _verbalizers(teacher, TEACHER_LAYERS, seed=5, zero_init=False)
    s_verbs = _verbalizers(student, STUDENT_LAYERS, seed=6, zero_init=False)
    student.apply_lora(LORA_RANK, LORA_RANK)
    objective = InteractionObjective(
        student,
        s_verbs,
        lambda b: teacher_signal(teacher, t_verbs, b, None, vocab_size=vocab),
        MatchingOptions(),
        LossOptions(intermediate=intermediate),
        generator=torch.Generator().manual_seed(0),
        vocab_size=vocab,
    )
    out = objective(batch)
    last = _reference_loss(teacher, student, t_verbs, s_verbs, batch, [], vocab)  # the last-layer KL alone
    with torch.no_grad():
        mask, targets = response_positions(batch["labels"])
        hidden = student.forward(model_inputs(batch)).hidden_states
        ce = {
            layer: torch.nn.functional.cross_entropy(
                s_verbs.head(layer, student.final_norm, student.lm_head)(hidden[layer][mask]).double(), targets
            ).item()
            for layer in STUDENT_LAYERS
        }
    assert "matched" not in out.metrics  # no matching without intermediate KL
    assert not any(key.startswith("kl/") and key != "kl/last" for key in out.metrics)
    if intermediate == "ce":
        assert min(ce.values()) > 1.0  # random heads: a real CE, not a vacuous zero
        for layer in STUDENT_LAYERS:
            assert out.metrics[f"ce/{layer}"] == pytest.approx(ce[layer], rel=1e-5)
        expected = last + sum(ce.values())
    else:
        expected = last
    assert out.metrics["kl/last"] == pytest.approx(last, rel=1e-5)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_interaction_rejects_an_unknown_intermediate_loss(setup):
    _, student, _, s_verbs, _ = setup
    student.apply_lora(LORA_RANK, LORA_RANK)
    with pytest.raises(ValueError, match=r"loss.intermediate='l2' is not one of kl, ce, none"):
        LossOptions(intermediate="l2")


@pytest.mark.parametrize("strategy", ["uniform", "multinomial"])
def test_interaction_loss_is_zero_for_identical_teacher_and_student(setup, strategy):
    _, student, _, s_verbs, batch = setup
    with torch.no_grad():  # make the verbalizers non-trivial
        for p in s_verbs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.apply_lora(LORA_RANK, LORA_RANK)  # B = 0: outputs unchanged
    objective = InteractionObjective(
        student,
        s_verbs,
        lambda b: teacher_signal(student, s_verbs, b, None),
        MatchingOptions(strategy=strategy),
        generator=torch.Generator().manual_seed(0),
    )
    out = objective(batch)
    assert out.metrics["matched"] == [[i] for i in range(len(STUDENT_LAYERS))]
    assert abs(out.loss.item()) < 1e-5


def test_matched_indices_obey_search_range_and_order(setup):
    teacher, student, t_verbs, s_verbs, batch = setup
    t_s, t_l = len(STUDENT_LAYERS), len(TEACHER_LAYERS)
    student.apply_lora(LORA_RANK, LORA_RANK)  # B = 0: outputs unchanged
    objective = top16_interaction(teacher, t_verbs, student, s_verbs)
    seen = set()
    with torch.no_grad():
        for _ in range(12):
            matched = objective(batch).metrics["matched"]
            assert len(matched) == t_s and all(len(m) == 1 for m in matched)
            picks = [m[0] for m in matched]
            for i_s, j in enumerate(picks):
                assert isinstance(j, int)
                assert i_s <= j <= t_l - t_s + i_s  # search range (keeps room for later student layers)
            assert all(a < b for a, b in zip(picks, picks[1:]))  # order preservation
            seen.add(tuple(picks))
    assert len(seen) > 1  # the matching is sampled, not fixed


# ------------------------------------------------------------------------------------------ empty batches
def _no_response(batch: dict) -> dict:
    """``batch`` with every label ignored, as when truncation cut each row's whole answer."""
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


@pytest.mark.parametrize("step", ["sft", "verbalize", "interact"])
def test_a_batch_without_response_tokens_trains_nothing_and_stays_finite(setup, step):
    """The guard: a batch whose rows have no response token gives a zero loss (not NaN) whose backward runs
    (so that every rank of a data-parallel step calls its collectives) and moves no weight."""
    teacher, student, t_verbs, s_verbs, batch = setup
    if step == "sft":
        objective = SFTObjective(student)
    elif step == "verbalize":
        objective = VerbalizationObjective(student, s_verbs)
    else:
        student.apply_lora(LORA_RANK, LORA_RANK)
        objective = top16_interaction(teacher, t_verbs, student, s_verbs)
    out = objective(_no_response(batch))
    assert out.loss.item() == 0.0 and all(v == 0.0 for k, v in out.metrics.items() if isinstance(v, float))
    out.loss.backward()
    grads = [p.grad for p in objective.parameters() if p.grad is not None]
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("student_layers", [[1], [1, 2, 3]])
def test_a_step_waits_for_the_device_once_beyond_the_forward_whatever_the_layers_and_chunks(setup, student_layers):
    """On a GPU the host waits for the device at every ``.item()`` and boolean-mask index. Beyond the model's
    own forward (transformers' Qwen2-VL waits 53 times in it, its image and rope bookkeeping), step 2 (with a
    precomputed signal, uniform matching, 2-token chunks) and step 1 find the response positions once and
    fetch their logged numbers in one transfer (not counted: a whole-tensor copy): one wait a micro-batch
    for 1 or 3 layers, where each layer's mask index and ``.item()`` used to add two."""
    teacher, student, t_verbs, _, batch = setup
    s_verbs = _verbalizers(student, student_layers, seed=6, zero_init=False)
    signal = teacher_signal(teacher, t_verbs, batch, 16, vocab_size=teacher.vocab_size)
    student.apply_lora(LORA_RANK, LORA_RANK)
    objective = InteractionObjective(
        student,
        s_verbs,
        lambda b: signal,
        MatchingOptions(strategy="uniform"),
        LossOptions(chunk_size=2),
        generator=torch.Generator().manual_seed(0),
    )
    for model, step in (
        (student, objective),
        (teacher, VerbalizationObjective(teacher, _verbalizers(teacher, student_layers, seed=7), 2)),
    ):
        with HostWaits() as forward:
            model.forward(model_inputs(batch), logits=False)
        with HostWaits() as waits:
            out = step(batch)
        assert forward.total > 0 and waits.counts == forward.counts + Counter({"nonzero": 1})
        assert all(isinstance(v, float) for k, v in out.metrics.items() if k != "matched")
    assert len([k for k in out.metrics if k.startswith("ce/")]) == len(student_layers)
