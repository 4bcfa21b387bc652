"""Tiny models use a width-scaled init: Linear weights ~ N(0, gain²/fan_in), LM head left as transformers sets it."""

import pytest
import torch

from vlsi_ray.data.synthetic import corpus_texts, generate_rows
from vlsi_ray.models import llava_onevision, qwen2_vl
from vlsi_ray.models.tokenizer import train_tokenizer


@pytest.mark.parametrize("module", [qwen2_vl, llava_onevision])
def test_fan_in_init_and_opt_out(module):
    tokenizer = train_tokenizer(corpus_texts(generate_rows("train", 40, seed=0)), module.FAMILY)
    scaled = module.build_tiny("student", tokenizer, hidden_size=64, num_layers=2, seed=0)
    default = module.build_tiny("student", tokenizer, hidden_size=64, num_layers=2, seed=0, init_gain=0)
    checked = 0
    for (name, lin), (_, ref) in zip(scaled.model.named_modules(), default.model.named_modules()):
        if not isinstance(lin, torch.nn.Linear) or lin.weight.numel() < 2048:
            continue
        if name.endswith("lm_head"):
            assert torch.equal(lin.weight, ref.weight)
            continue
        assert lin.weight.std().item() == pytest.approx(lin.in_features**-0.5, rel=0.15), name
        if "language_model" in name:  # transformers' initializer_range (SigLIP has its own init)
            assert ref.weight.std().item() == pytest.approx(0.02, rel=0.15), name
        checked += 1
    assert checked >= 8
