"""Verbalizers: logit lens at init, parameter count, save/load."""

import torch
from torch import nn

from vlsi_ray.models.verbalizer import Verbalizers


def _norm_and_head(d=16, vocab=40):
    torch.manual_seed(0)
    return nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)


def test_residual_zero_init_equals_logit_lens():
    norm, head = _norm_and_head()
    verbs = Verbalizers(16, [1, 3], residual=True, zero_init=True)
    h = torch.randn(5, 16)
    for layer in (1, 3):
        torch.testing.assert_close(verbs.head(layer, norm, head)(h), head(norm(h)), rtol=0, atol=0)


def test_plain_form_differs_from_logit_lens():
    norm, head = _norm_and_head()
    verbs = Verbalizers(16, [2], residual=False, zero_init=False)
    h = torch.randn(5, 16)
    assert not torch.allclose(verbs.head(2, norm, head)(h), head(norm(h)))


def test_parameter_count_is_three_d_squared_per_layer():
    d, layers = 24, [2, 6, 10, 14, 18, 22, 26]
    verbs = Verbalizers(d, layers)
    assert sum(p.numel() for p in verbs.parameters()) == 3 * d * d * len(layers)


def test_save_load_round_trip(tmp_path):
    norm, head = _norm_and_head()
    verbs = Verbalizers(16, [1, 2], residual=True, zero_init=False)
    verbs.save(tmp_path)
    loaded = Verbalizers.load(tmp_path)
    assert loaded.layers == [1, 2] and loaded.residual and not loaded.zero_init
    h = torch.randn(3, 16)
    torch.testing.assert_close(loaded.head(2, norm, head)(h), verbs.head(2, norm, head)(h), rtol=0, atol=0)
    assert Verbalizers.exists(tmp_path)
