"""Registries instead of parallel lists: a new matching strategy, temperature rule, loss term or backbone family is
one registration, and the config's validation and error messages read the registries' keys."""

from __future__ import annotations

import pytest
import torch

from vlsi_ray.config import ConfigError, load_config
from vlsi_ray.method import matching, steps
from vlsi_ray.method.matching import MatchingOptions, match_layers
from vlsi_ray.method.steps import LossOptions
from vlsi_ray.models.families import FAMILIES, get_family


@pytest.fixture
def registered():
    """Register a strategy, a temperature rule and a loss term for one test, then remove them."""

    @matching.strategy("last_window", uses_distances=False)
    def last_window(d, window, i_s, t_s, t_l, options, generator):
        probs = torch.zeros(len(window), dtype=torch.float64)
        probs[-1] = 1.0
        return [window[-1]], [1.0], probs, float("nan")

    @matching.temperature_rule("unit")
    def unit(d, options):
        return 1.0

    @steps.loss_term(steps.LAST_LAYER_TERMS, "half_kl")
    def half_kl(objective, step):
        value, metrics = steps.LAST_LAYER_TERMS["kl"](objective, step)
        return value / 2, {"half_kl/last": value.item() / 2}

    yield
    del matching.STRATEGIES["last_window"], matching.TEMPERATURES["unit"], steps.LAST_LAYER_TERMS["half_kl"]


def test_a_registered_strategy_and_rule_are_config_values_and_used(registered):
    cfg = load_config(None, ["matching.strategy=last_window", "matching.temperature=unit", "loss.last_layer=half_kl"])
    assert (cfg.matching.strategy, cfg.matching.temperature, cfg.loss.last_layer) == ("last_window", "unit", "half_kl")
    distances = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    match = match_layers(distances, cfg.matching, torch.Generator().manual_seed(0))
    assert match.indices == [[1], [2]]  # the last teacher layer of each search window (t_l = 3, t_s = 2)
    multinomial = MatchingOptions(temperature="unit")
    assert match_layers(distances, multinomial, torch.Generator().manual_seed(0)).temperatures == [1.0, 1.0]


def test_unregistered_names_are_refused_listing_the_registered_ones():
    with pytest.raises(ConfigError, match=r"matching.strategy must be one of \('multinomial', 'random', 'uniform', 'bottom_k'\)"):
        load_config(None, ["matching.strategy=last_window"])
    with pytest.raises(ConfigError, match=r"loss.last_layer='half_kl' is not one of kl, ce, none"):
        load_config(None, ["loss.last_layer=half_kl"])
    with pytest.raises(ValueError, match="matching.temperature must be one of"):
        MatchingOptions(temperature="unit")
    assert set(steps.INTERMEDIATE_TERMS) == {"kl", "ce", "none"} and LossOptions().intermediate in steps.INTERMEDIATE_TERMS


def test_every_registered_family_is_a_config_choice_with_its_tiny_builder():
    for family in FAMILIES:
        cfg = load_config(None, [f"teacher.family={family}", f"student.family={family}"])
        assert cfg.student.family == family and callable(get_family(family).build_tiny)
    with pytest.raises(ConfigError, match="teacher.family='idefics3' is not one of qwen2_vl, qwen2_5_vl, llava_onevision"):
        load_config(None, ["teacher.family=idefics3", "student.family=idefics3"])
