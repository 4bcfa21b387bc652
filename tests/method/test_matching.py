"""Adaptive layer matching: windows, order, the Fig. 2 example, sampling law, determinism, baselines."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from vlsi_ray.method.matching import MatchingOptions, band_mask, candidate_window, match_layers

PAPER = MatchingOptions()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def sizes_and_distances(draw):
    t_l = draw(st.integers(1, 24))
    t_s = draw(st.integers(1, t_l))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    d = torch.rand(t_s, t_l, generator=_gen(seed), dtype=torch.float64) * scale
    return t_s, t_l, d, seed


ORDERED = [
    PAPER,
    MatchingOptions(temperature="adaptive_b"),
    MatchingOptions(temperature="fixed", fixed_temperature=0.3),
    MatchingOptions(strategy="random"),
    MatchingOptions(strategy="uniform"),
    MatchingOptions(strategy="bottom_k", bottom_k=1),
    MatchingOptions(strategy="bottom_k", bottom_k=3),
]


@settings(max_examples=150, deadline=None)
@given(sizes_and_distances(), st.sampled_from(ORDERED))
def test_ordered_picks_stay_in_their_windows(case, options):
    t_s, t_l, d, seed = case
    band = band_mask(t_s, t_l, options)
    d = d.masked_fill(~band, float("nan"))  # entries outside the band must never be read
    match = match_layers(d, options, _gen(seed))
    prev = -1
    for i_s, (chosen, weights, window, probs) in enumerate(zip(match.indices, match.weights, match.windows, match.probabilities)):
        assert window == range(prev + 1, t_l - t_s + i_s + 1)
        assert all(band[i_s, j] for j in window)
        assert chosen == sorted(set(chosen)) and prev + 1 <= chosen[0] and chosen[-1] <= t_l - t_s + i_s
        assert sum(weights) == pytest.approx(1.0) and len(weights) == len(chosen)
        assert probs.shape == (len(window),) and float(probs.sum()) == pytest.approx(1.0)
        prev = chosen[-1]
    assert len(match.indices) == t_s


@settings(max_examples=100, deadline=None)
@given(sizes_and_distances())
def test_band_mask_is_the_union_of_all_windows(case):
    t_s, t_l, _, _ = case
    for options in (PAPER, MatchingOptions(order_preservation=False)):
        union = torch.zeros(t_s, t_l, dtype=torch.bool)
        for i_s in range(t_s):
            for start in range(i_s, t_l - t_s + i_s + 1):
                union[i_s, list(candidate_window(i_s, start, t_s, t_l, options))] = True
        assert torch.equal(union, band_mask(t_s, t_l, options))
    assert band_mask(t_s, t_l, MatchingOptions(search_range=False, order_preservation=False)).all()


def test_paper_fig2_example():
    # t_l = 8, t_s = 4 (1-based in the paper): student 2 picks teacher 4 -> student 3 searches 5..7.
    assert candidate_window(2, 4, 4, 8, PAPER) == range(4, 7)
    assert candidate_window(0, 0, 4, 8, PAPER) == range(0, 5)  # student 1: teachers 1..5
    d = torch.full((4, 8), 100.0)
    d[0, 0] = d[1, 3] = d[2, 6] = d[3, 7] = 0.0  # picks are certain at the adaptive temperature
    match = match_layers(d, PAPER, _gen(0))
    assert match.indices == [[0], [3], [6], [7]]
    assert match.windows == [range(0, 5), range(1, 6), range(4, 7), range(7, 8)]
    # Adaptive temperature: T = 2 / (max - min + eps) over the window.
    assert match.temperatures[0] == pytest.approx(2 / (100 + 1e-6))


def test_multinomial_frequencies_follow_softmax_with_adaptive_temperature():
    d = torch.tensor(
        [[0.30, 0.10, 0.55, 0.20, 0.95, 0.40, 0.70, 0.5], [0.9, 0.8, 0.1, 0.4, 0.3, 0.6, 0.2, 0.0]], dtype=torch.float64
    )
    window = d[0, :7]  # t_s = 2, t_l = 8: student 0 sees teachers 0..6
    T = 2.0 / float(window.max() - window.min() + 1e-6)
    expected = torch.softmax(-window / T, 0).numpy()
    g = _gen(1234)
    draws = 6000
    counts = np.bincount([match_layers(d, PAPER, g).indices[0][0] for _ in range(draws)], minlength=7)
    assert counts.sum() == draws
    _, p_value = chisquare(counts, expected * draws)
    assert p_value > 1e-3
    # The logged distributions are exactly those softmaxes, the second one over the pick's successors.
    match = match_layers(d, PAPER, g)
    np.testing.assert_allclose(match.probabilities[0].numpy(), expected, rtol=1e-12)
    second = d[1, match.indices[0][0] + 1 :]
    T1 = 2.0 / float(second.max() - second.min() + 1e-6)
    np.testing.assert_allclose(match.probabilities[1].numpy(), torch.softmax(-second / T1, 0).numpy(), rtol=1e-12)


def test_other_temperatures():
    d = torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.float64)
    b = match_layers(d, MatchingOptions(temperature="adaptive_b"), _gen(0))
    assert b.temperatures[0] == pytest.approx(2.0 / 2.0 + 1e-6)
    np.testing.assert_allclose(b.probabilities[0].numpy(), torch.softmax(-d[0] / (1 + 1e-6), 0).numpy())
    fixed = match_layers(d, MatchingOptions(temperature="fixed", fixed_temperature=0.5), _gen(0))
    assert fixed.temperatures[0] == 0.5
    np.testing.assert_allclose(fixed.probabilities[0].numpy(), torch.softmax(-d[0] / 0.5, 0).numpy())
    # Equal distances: the adaptive temperature is huge, the choice uniform.
    flat = match_layers(torch.ones(1, 4), PAPER, _gen(0))
    np.testing.assert_allclose(flat.probabilities[0].numpy(), 0.25)


@pytest.mark.parametrize("options", ORDERED, ids=lambda o: f"{o.strategy}-{o.temperature}-{o.bottom_k}")
def test_same_generator_state_same_matching(options):
    d = torch.rand(7, 20, generator=_gen(5))
    g = _gen(99)
    state = g.get_state()
    first = [match_layers(d, options, g).indices for _ in range(5)]
    g.set_state(state)
    again = [match_layers(d, options, g).indices for _ in range(5)]
    assert first == again
    if options.strategy in ("multinomial", "random"):
        assert len({str(m) for m in first}) > 1  # and the generator does advance


def test_uniform_baseline_indices():
    # Paper: i_l = i_s·floor(t_l/t_s), 1-based; 7 student and 20 teacher targets -> teachers 2, 4, ..., 14.
    match = match_layers(torch.zeros(7, 20), MatchingOptions(strategy="uniform"), _gen(0))
    assert match.indices == [[1], [3], [5], [7], [9], [11], [13]]
    assert match_layers(torch.zeros(4, 8), MatchingOptions(strategy="uniform"), _gen(0)).indices == [[1], [3], [5], [7]]
    assert match_layers(torch.zeros(3, 3), MatchingOptions(strategy="uniform"), _gen(0)).indices == [[0], [1], [2]]


def test_bottom_k_baseline_picks_the_smallest():
    d = torch.tensor([[0.5, 0.1, 0.9, 0.05, 0.3, 0.2]], dtype=torch.float64)
    one = match_layers(d, MatchingOptions(strategy="bottom_k"), _gen(0))
    assert one.indices == [[3]] and one.weights == [[1.0]]
    three = match_layers(d, MatchingOptions(strategy="bottom_k", bottom_k=3), _gen(0))
    assert three.indices == [[1, 3, 5]] and three.weights == [[1 / 3] * 3]
    free = MatchingOptions(strategy="bottom_k", bottom_k=2, search_range=False, order_preservation=False)
    d2 = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 1.0, 4.0]])
    assert match_layers(d2, free, _gen(0)).indices == [[1, 3], [0, 2]]
    # k larger than the window: the whole window, equally weighted.
    many = match_layers(torch.rand(3, 4, generator=_gen(1)), MatchingOptions(strategy="bottom_k", bottom_k=5), _gen(0))
    assert many.indices[0] == [0, 1] and many.weights[0] == [0.5, 0.5]


def test_random_baseline_covers_the_window_uniformly():
    d = torch.full((2, 6), float("nan"))  # random never reads distances
    g = _gen(7)
    picks = [match_layers(d, MatchingOptions(strategy="random"), g).indices[0][0] for _ in range(3000)]
    counts = np.bincount(picks, minlength=5)
    assert counts.size == 5 and (counts > 0).all()  # window of student 0: teachers 0..4
    assert chisquare(counts).pvalue > 1e-3
    free = MatchingOptions(strategy="random", search_range=False, order_preservation=False)
    seen = {j for _ in range(400) for j in match_layers(d, free, g).indices[1]}
    assert seen == set(range(6))  # without search range: all teacher layers


def test_without_search_range_and_order_all_layers_are_candidates():
    free = MatchingOptions(search_range=False, order_preservation=False)
    d = torch.rand(3, 5, generator=_gen(3))
    match = match_layers(d, free, _gen(0))
    assert match.windows == [range(5)] * 3
    ranged = match_layers(d, MatchingOptions(order_preservation=False), _gen(0))
    assert ranged.windows == [range(0, 3), range(1, 4), range(2, 5)]


def test_pairs_and_weights():
    free = MatchingOptions(strategy="bottom_k", bottom_k=2, search_range=False, order_preservation=False)
    match = match_layers(torch.rand(3, 9, generator=_gen(2)), free, _gen(0))
    pairs = list(match.pairs())
    assert [p[0] for p in pairs] == [0, 0, 1, 1, 2, 2] and all(w == 0.5 for _, _, w in pairs)
    assert math.isnan(match.temperatures[0])
    # Under order preservation a later window can hold fewer than k layers: it then takes them all.
    ordered = match_layers(torch.rand(3, 5, generator=_gen(2)), MatchingOptions(strategy="bottom_k", bottom_k=2), _gen(0))
    assert all(len(w) == len(i) and sum(w) == pytest.approx(1.0) for i, w in zip(ordered.indices, ordered.weights))


def test_option_and_argument_errors():
    bad = [
        (dict(strategy="greedy"), "strategy"),
        (dict(temperature="cosine"), "temperature must be one of"),
        (dict(search_range=False), "order_preservation requires search_range"),
        (dict(bottom_k=0), "bottom_k"),
        (dict(temperature_scale=0.0), "temperature_scale"),
        (dict(fixed_temperature=-1.0), "fixed_temperature"),
        (dict(eps=0.0), "eps"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            MatchingOptions(**kwargs)
    with pytest.raises(ValueError, match="t_s <= t_l"):
        match_layers(torch.zeros(5, 4), PAPER, _gen(0))
    with pytest.raises(ValueError, match="t_s <= t_l"):
        band_mask(3, 2, PAPER)
    with pytest.raises(ValueError, match="not finite"):
        match_layers(torch.tensor([[0.0, float("inf")]]), PAPER, _gen(0))
    with pytest.raises(ValueError, match="matrix"):
        match_layers(torch.zeros(4), PAPER, _gen(0))
    with pytest.raises(ValueError, match="window start"):
        candidate_window(1, 0, 2, 4, PAPER)
