"""Backbone adapters over real transformers VLM classes (tiny, offline), per family."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy
import io
import json
import re

import pytest
import torch
from PIL import Image, ImageDraw

from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.models import (
    ModelInfo,  # noqa: E402
    llava_onevision,
    qwen2_5_vl,
    qwen2_vl,
)
from vlsi_ray.models.backbone import (
    Backbone,
    IncompatibleModelsError,
    UnsupportedModelError,
    check_compatible,
    image_token_count,
    load_backbone,
)
from vlsi_ray.models.tokenizer import train_tokenizer
from vlsi_ray.prepare import check_pair, check_pair_paths  # noqa: E402

MODULES = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "llava_onevision": llava_onevision}
QUESTION = "What colour is the star?\nA. red\nB. green\nC. blue\nD. yellow\nAnswer with the option's letter."
TEXTS = [QUESTION, "red star top left. blue square with a dot bottom right.", "A", "B", "C", "D"] * 20
#: placeholder tokens for one 112×112 image (see the family modules' docstrings)
IMAGE_TOKENS = {"qwen2_vl": 16, "qwen2_5_vl": 16, "llava_onevision": 36}


def make_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        image = Image.new("RGB", (112, 112), "white")
        ImageDraw.Draw(image).rectangle([4 * i, 8, 40 + 4 * i, 60], fill=("red", "green", "blue", "yellow")[i % 4])
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        answer = "ABCD"[i % 4] if i % 3 else "red star top left. blue square bottom right."
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        rows.append(
            {
                "id": f"row-{i}",
                "images": [buffer.getvalue()],
                "messages": json.dumps(messages),
                "answer": answer,
                "task": "colour",
                "split": "train",
            }
        )
    return rows


@pytest.fixture(scope="module", params=list(MODULES))
def setup(request):
    family = request.param
    tok = train_tokenizer(TEXTS, family)
    student = MODULES[family].build_tiny("student", tok)
    teacher = MODULES[family].build_tiny("teacher", tok)
    batch = ChatCollator(tok, student.image_processor, family)(make_rows(4))
    return family, tok, teacher, student, batch


def test_structure_and_sizes(setup):
    family, tok, teacher, student, batch = setup
    assert (teacher.num_layers, teacher.hidden_size, student.num_layers, student.hidden_size) == (8, 128, 4, 64)
    assert teacher.vocab_size == student.vocab_size == -(-len(tok) // 64) * 64
    assert teacher.family == student.family == family
    assert teacher.decoder_layers is teacher.model.model.language_model.layers
    assert teacher.lm_head.weight.data_ptr() != teacher.model.get_input_embeddings().weight.data_ptr()  # untied
    assert teacher.image_token_id == tok.convert_tokens_to_ids(teacher.spec.image_token)
    assert image_token_count(teacher, 112, 112) == IMAGE_TOKENS[family]


def test_hidden_states_and_heads(setup):
    family, _, _, student, batch = setup
    L = student.num_layers
    with torch.no_grad():
        out = student.forward(batch)
        B, T = batch["input_ids"].shape
        assert len(out.hidden_states) == L + 1
        assert all(h.shape == (B, T, student.hidden_size) for h in out.hidden_states)
        assert out.logits.shape == (B, T, student.vocab_size)
        torch.testing.assert_close(student.lm_head(out.hidden_states[-1]), out.logits)
        text = batch["input_ids"] != student.image_token_id  # embeddings first (images scattered in)
        embeddings = student.model.get_input_embeddings()(batch["input_ids"])
        torch.testing.assert_close(out.hidden_states[0][text], embeddings[text])
        # hidden_states[L] is already final-normed: norming it again changes the logits once the
        # norm weight is not all ones (at init it is, so we perturb it on a copy of the forward).
        norm = student.final_norm
        saved = norm.weight.detach().clone()
        norm.weight.data = torch.linspace(0.5, 2.0, saved.numel())
        out = student.forward(batch)
        last = out.hidden_states[L]
        assert not torch.allclose(student.lm_head(norm(last)), out.logits, atol=1e-3)
        torch.testing.assert_close(student.lm_head(student.lens_input(out.hidden_states, L)), out.logits)
        torch.testing.assert_close(student.lens_input(out.hidden_states, 2), norm(out.hidden_states[2]))
        norm.weight.data = saved


def test_save_and_load_round_trip(setup, tmp_path):
    family, tok, _, student, batch = setup
    student.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "vlsi_backbone.json").read_text())["family"] == family
    loaded = load_backbone(tmp_path / "ckpt")
    assert loaded.family == family and loaded.name == str(tmp_path / "ckpt")
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()
    assert loaded.tokenizer.chat_template == tok.chat_template
    assert type(loaded.image_processor) is type(student.image_processor)
    # the loaded tokenizer + image processor collate the same batch, and the logits are identical
    again = ChatCollator(loaded.tokenizer, loaded.image_processor, family)(make_rows(4))
    for key, value in batch.items():
        assert torch.equal(value, again[key]) if torch.is_tensor(value) else value == again[key]
    with torch.no_grad():
        assert torch.equal(student.forward(batch).logits, loaded.forward(again).logits)
    # the family is found from config.json alone too (a stock checkpoint directory)
    (tmp_path / "ckpt" / "vlsi_backbone.json").unlink()
    assert Backbone.from_pretrained(tmp_path / "ckpt", dtype="float32").family == family


def test_parameter_groups_partition_all_parameters(setup):
    _, _, teacher, _, _ = setup
    groups = teacher.parameter_groups()
    assert set(groups) == {"vision", "projector", "embeddings", "language", "head"}
    assert all(groups.values())
    ids = [id(p) for params in groups.values() for _, p in params]
    assert len(ids) == len(set(ids)) == len(list(teacher.model.parameters()))
    assert sum(p.numel() for params in groups.values() for _, p in params) == sum(p.numel() for p in teacher.model.parameters())
    assert [n for n, _ in groups["head"]] == ["lm_head.weight"]
    assert [n for n, _ in groups["embeddings"]] == ["model.language_model.embed_tokens.weight"]
    assert any(p is teacher.final_norm.weight for _, p in groups["language"])


def test_lora_targets_only_the_language_model(setup):
    _, _, teacher, _, _ = setup
    names = [n for n, m in teacher.model.named_modules() if re.fullmatch(teacher.lora_target_modules, n)]
    assert len(names) == 7 * teacher.num_layers
    assert all(n.startswith("model.language_model.layers.") for n in names)
    assert all(isinstance(teacher.model.get_submodule(n), torch.nn.Linear) for n in names)
    vision = [n for n, _ in teacher.model.named_modules() if "vision" in n or "visual" in n]
    assert vision and not any(re.fullmatch(teacher.lora_target_modules, n) for n in vision)


def test_apply_and_merge_lora(setup):
    family, tok, _, _, batch = setup
    model = MODULES[family].build_tiny("student", tok, seed=3)
    with torch.no_grad():
        base = model.forward(batch).logits
        head, norm, layers = model.lm_head, model.final_norm, model.decoder_layers
        model.apply_lora(rank=4, alpha=8, dropout=0.0)
        assert model.lora_active and model.lm_head is head and model.final_norm is norm and model.decoder_layers is layers
        torch.testing.assert_close(model.forward(batch).logits, base, rtol=0, atol=0)  # B is zero-initialised
        lora = [(n, p) for n, p in model.model.named_parameters() if "lora_" in n]
        assert len(lora) == 2 * 7 * model.num_layers and all(p.requires_grad for _, p in lora)
        assert not any(p.requires_grad for n, p in model.model.named_parameters() if "lora_" not in n)
        in_language = {n for n, _ in model.parameter_groups()["language"]}
        assert all(n.removeprefix("base_model.model.") in in_language for n, _ in lora)
        for name, param in lora:
            if "lora_B" in name:
                param.normal_(std=0.05)
        adapted = model.forward(batch).logits
        assert not torch.allclose(adapted, base, atol=1e-4)
        model.merge_lora()
        assert not model.lora_active and model.lm_head is head and model.decoder_layers is layers
        torch.testing.assert_close(model.forward(batch).logits, adapted, rtol=1e-4, atol=1e-4)
    assert all(p.requires_grad for p in model.model.parameters())  # flags restored
    assert not any("lora" in n for n, _ in model.model.named_parameters())


@pytest.mark.parametrize("order", ["checkpointing, then LoRA", "LoRA, then checkpointing"])
def test_checkpointing_keeps_frozen_embeddings_and_the_vision_tower_out_of_backward(setup, order):
    """transformers (enabling checkpointing) and peft (wrapping a checkpointing model) hook every
    embedding module, the vision tower's patch embedding included, to make its output require grad,
    which would recompute and backpropagate the frozen ViT in every step; the backbone removes them."""
    from transformers import PreTrainedModel  # noqa: PLC0415

    family, tok, teacher, student, batch = setup
    student = copy.deepcopy(student)
    steps = [lambda: student.set_gradient_checkpointing(True), lambda: student.apply_lora(4, 4)]
    for step in steps if order.startswith("checkpointing") else steps[::-1]:
        step()
    student.model.train()
    seen = {}
    embeddings = {
        id(e): e
        for m in student.base_model.modules()
        if isinstance(m, PreTrainedModel) and (e := m.get_input_embeddings()) is not None
    }
    for key, module in embeddings.items():
        module.register_forward_hook(lambda module, args, out, key=key: seen.__setitem__(key, out.requires_grad))
    out = student.forward({k: v for k, v in batch.items() if k != "labels"}, logits=False)
    assert len(embeddings) >= 2 and set(seen) == set(embeddings)  # the tokens' and the vision tower's
    assert not any(seen.values())
    assert out.hidden_states[-1].requires_grad  # LoRA still trains


def test_build_is_deterministic_given_seed(setup):
    family, tok, _, _, _ = setup
    a = MODULES[family].build_tiny("student", tok, seed=7).model.state_dict()
    b = MODULES[family].build_tiny("student", tok, seed=7).model.state_dict()
    c = MODULES[family].build_tiny("student", tok, seed=8).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    sized = MODULES[family].build_tiny(
        "teacher", tok, hidden_size=96, num_layers=3, num_heads=3, intermediate_size=160, vision_depth=1, vision_embed_dim=48
    )
    assert (sized.hidden_size, sized.num_layers) == (96, 3)
    with pytest.raises(TypeError, match="unknown override 'layers'"):
        MODULES[family].build_tiny("student", tok, layers=2)


def test_mm_token_type_ids_are_what_qwen2_vl_needs(setup):
    family, _, _, student, batch = setup
    if family == "llava_onevision":
        assert "mm_token_type_ids" not in batch and "mm_token_type_ids" not in student.spec.model_input_names
        return
    # transformers 5.24 computes M-RoPE positions from them whenever image_grid_thw is passed: Qwen2-VL
    # refuses a batch without them, Qwen2.5-VL silently falls back to 1-D positions (other logits)
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == student.image_token_id).int())
    without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    if family == "qwen2_vl":
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            student.forward(without)
    else:
        with torch.no_grad():
            assert not torch.allclose(student.forward(without).logits, student.forward(batch).logits, atol=1e-4)


def test_check_compatible(setup, tmp_path):
    family, tok, teacher, student, _ = setup
    check_compatible(teacher, student)
    module = MODULES[family]
    bigger = module.build_tiny("student", tok, vocab_size=teacher.vocab_size + 128)  # 2B-vs-7B style head padding
    smaller = module.build_tiny("student", tok, vocab_size=len(tok))
    check_compatible(teacher, bigger)
    check_compatible(bigger, smaller)

    # a tokenizer with two BPE tokens swapped inside the shared prefix is refused, naming them
    vocab = tok.get_vocab()
    first, second = tok.convert_ids_to_tokens([300, 301])
    tok.save_pretrained(tmp_path / "tok")
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    data["model"]["vocab"][first], data["model"]["vocab"][second] = vocab[second], vocab[first]
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    from transformers import AutoTokenizer  # noqa: PLC0415 (transformers loads on use (after the offline defaults are set))

    swapped = module.build_tiny("student", AutoTokenizer.from_pretrained(tmp_path / "tok"))
    with pytest.raises(
        IncompatibleModelsError, match=rf"token id 300 \({re.escape(repr(first))} vs {re.escape(repr(second))}\)"
    ) as err:
        check_compatible(teacher, swapped)
    assert teacher.name in str(err.value) and swapped.name in str(err.value)

    other = "llava_onevision" if family == "qwen2_vl" else "qwen2_vl"
    stranger = MODULES[other].build_tiny("student", train_tokenizer(TEXTS, other))
    with pytest.raises(IncompatibleModelsError, match=f"pick a {family} student"):
        check_compatible(teacher, stranger)

    low_res = module.build_tiny("student", tok, image_size=56)
    with pytest.raises(IncompatibleModelsError, match="image tokens"):
        check_compatible(teacher, low_res)


def test_weight_free_check_reads_what_the_backbones_give(setup, tmp_path):
    family, tok, teacher, student, _ = setup
    bigger = MODULES[family].build_tiny("student", tok, vocab_size=teacher.vocab_size + 128)
    low_res = MODULES[family].build_tiny("student", tok, image_size=56)
    for name, backbone in (("teacher", teacher), ("student", student), ("bigger", bigger), ("low_res", low_res)):
        backbone.save_pretrained(tmp_path / name)
        (tmp_path / name / "model.safetensors").unlink()  # the check must not need the weights
    info = ModelInfo.from_pretrained(tmp_path / "bigger")
    assert (info.family, info.vocab_size, info.image_token_id) == (family, bigger.vocab_size, bigger.image_token_id)
    assert check_pair_paths(tmp_path / "teacher", tmp_path / "bigger") == check_pair(teacher, bigger) == teacher.vocab_size
    assert check_pair_paths(tmp_path / "teacher", tmp_path / "student") == min(teacher.vocab_size, student.vocab_size)
    with pytest.raises(IncompatibleModelsError, match="image tokens"):
        check_pair_paths(tmp_path / "teacher", tmp_path / "low_res")


def test_load_errors_are_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "missing")
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        load_backbone(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="'bert' model, which is not supported"):
        load_backbone(tmp_path)
