"""Adaptive layer matching (VLsI step 2) and the paper's ablation baselines.

Student target layer ``i_s`` (0-based, in order) is matched to one teacher target layer chosen from
a window of candidates, given the matrix ``d[i_s, j]`` of verbalized KLs::

    start = 0
    for i_s in 0 .. t_s-1:
        window = start .. t_l - t_s + i_s                  # inclusive; leaves room for later layers
        T = scale / (max(d[window]) - min(d[window]) + eps)  # adaptive temperature (formula A)
        pick ~ Multinomial(softmax(-d[window] / T))          # no gradient through sampling
        start = pick + 1                                     # order preservation

Example (the paper's Fig. 2, 1-based): t_l = 8, t_s = 4; if student layer 2 picks teacher 4, student
layer 3 searches teachers 5..7. All indices here are 0-based positions in the target-layer lists.

Only the given ``torch.Generator`` (CPU) is used for sampling, so a run is reproducible and resumes
exactly from ``generator.get_state()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

#: temperature rule name -> ``(d [window] float64, options) -> T`` (:func:`temperature_rule` registers one).
TEMPERATURES: dict[str, Callable[[Tensor, MatchingOptions], float]] = {}


@dataclass(frozen=True)
class Strategy:
    """A registered matching strategy: ``pick(d, window, i_s, t_s, t_l, options, generator)`` returns
    ``(chosen teacher layers, their weights, probabilities over the window, temperature or nan)``;
    ``uses_distances`` says whether it reads ``d`` (the candidate KLs are computed only then)."""

    pick: Callable
    uses_distances: bool


#: strategy name -> :class:`Strategy` (:func:`strategy` registers one). Config validation reads the keys.
STRATEGIES: dict[str, Strategy] = {}


def temperature_rule(name: str):
    """Register a temperature rule for the ``multinomial`` strategy under ``name``."""

    def register(fn):
        TEMPERATURES[name] = fn
        return fn

    return register


def strategy(name: str, uses_distances: bool):
    """Register a matching strategy under ``name`` (see :class:`Strategy` for its signature)."""

    def register(fn):
        STRATEGIES[name] = Strategy(fn, uses_distances)
        return fn

    return register


@dataclass(frozen=True)
class MatchingOptions:
    """How student layers pick teacher layers.

    - ``strategy``: ``multinomial`` (paper), or the ablation baselines ``random`` (uniform over the
      window), ``uniform`` (fixed ``i_l = i_s·floor(t_l/t_s)``, 1-based), ``bottom_k`` (mean over the
      ``bottom_k`` smallest KLs in the window).
    - ``temperature``: ``adaptive`` (paper, formula A: ``T = scale / (max(d) - min(d) + eps)``),
      ``adaptive_b`` (the other reading: ``T = (max(d) - min(d)) / scale + eps``) or ``fixed``
      (``T = fixed_temperature``). Used by ``multinomial`` only.
    - ``search_range``: restrict student layer ``i_s`` to teachers ``.. t_l - t_s + i_s`` (lower
      bound ``i_s`` without order preservation); without it, every teacher layer is a candidate.
    - ``order_preservation``: the lower bound is the previous pick + 1 (needs ``search_range``).
    """

    strategy: str = "multinomial"
    temperature: str = "adaptive"
    temperature_scale: float = 2.0
    fixed_temperature: float = 1.0
    eps: float = 1e-6
    search_range: bool = True
    order_preservation: bool = True
    bottom_k: int = 1

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"matching.strategy must be one of {tuple(STRATEGIES)}, got {self.strategy!r}.")
        if self.temperature not in TEMPERATURES:
            raise ValueError(f"matching.temperature must be one of {tuple(TEMPERATURES)}, got {self.temperature!r}.")
        if not self.temperature_scale > 0:
            raise ValueError(f"matching.temperature_scale must be positive, got {self.temperature_scale}.")
        if not self.fixed_temperature > 0:
            raise ValueError(f"matching.fixed_temperature must be positive, got {self.fixed_temperature}.")
        if not self.eps > 0:
            raise ValueError(f"matching.eps must be positive, got {self.eps}.")
        if self.order_preservation and not self.search_range:
            raise ValueError("matching.order_preservation requires search_range=True (the paper adds them in that order).")
        if isinstance(self.bottom_k, bool) or not isinstance(self.bottom_k, int) or self.bottom_k < 1:
            raise ValueError(f"matching.bottom_k must be an integer of at least 1, got {self.bottom_k!r}.")

    @property
    def uses_distances(self) -> bool:
        """Whether the strategy reads the distances (``random`` and ``uniform`` do not)."""
        return STRATEGIES[self.strategy].uses_distances


@dataclass
class Match:
    """One matching of ``t_s`` student layers to teacher layers (0-based target-layer positions).

    ``indices[i_s]``: teacher layers chosen for student layer ``i_s`` (one, or up to ``bottom_k``).
    ``weights[i_s]``: their loss weights (1.0, or 1/k for the bottom-k mean).
    ``windows[i_s]``: the candidate teacher layers that were considered.
    ``probabilities[i_s]``: float64 ``[len(windows[i_s])]``, the distribution the pick was drawn from
    (for deterministic strategies, the weights spread over the chosen entries).
    ``temperatures[i_s]``: the softmax temperature used (``nan`` for strategies without one).
    """

    indices: list[list[int]]
    weights: list[list[float]]
    windows: list[range]
    probabilities: list[Tensor]
    temperatures: list[float]

    def pairs(self) -> Iterator[tuple[int, int, float]]:
        """``(i_s, j, weight)`` for every chosen pair, in student order."""
        for i_s, (indices, weights) in enumerate(zip(self.indices, self.weights)):
            for j, w in zip(indices, weights):
                yield i_s, j, w


def _check_sizes(t_s: int, t_l: int) -> None:
    if t_s < 1 or t_s > t_l:
        raise ValueError(f"layer matching needs 1 <= t_s <= t_l student/teacher target layers, got t_s={t_s}, t_l={t_l}.")


def candidate_window(i_s: int, start: int, t_s: int, t_l: int, options: MatchingOptions) -> range:
    """Teacher layers student layer ``i_s`` may pick (0-based).

    With ``search_range``: ``start .. t_l - t_s + i_s`` inclusive, where ``start`` is the previous
    pick + 1 under order preservation (ignored, and ``i_s`` used, without it). Without
    ``search_range``: ``0 .. t_l - 1``.
    """
    _check_sizes(t_s, t_l)
    if not 0 <= i_s < t_s:
        raise ValueError(f"student layer i_s={i_s} is outside 0..{t_s - 1}.")
    if not options.search_range:
        return range(t_l)
    hi = t_l - t_s + i_s
    lo = start if options.order_preservation else i_s
    if not i_s <= lo <= hi:
        raise ValueError(f"window start {lo} for student layer {i_s} must lie in {i_s}..{hi} (t_s={t_s}, t_l={t_l}).")
    return range(lo, hi + 1)


def band_mask(t_s: int, t_l: int, options: MatchingOptions) -> Tensor:
    """``bool [t_s, t_l]``: every (student, teacher) pair any window can contain.

    Row ``i_s`` is ``i_s .. t_l - t_s + i_s`` with ``search_range`` (order preservation only
    narrows it), all true without. Compute distances only here (``options.uses_distances`` says
    whether the strategy reads them at all).
    """
    _check_sizes(t_s, t_l)
    if not options.search_range:
        return torch.ones(t_s, t_l, dtype=torch.bool)
    i = torch.arange(t_s)[:, None]
    j = torch.arange(t_l)[None, :]
    return (j >= i) & (j <= t_l - t_s + i)


@temperature_rule("adaptive")
def _adaptive(d: Tensor, options: MatchingOptions) -> float:
    """The paper's formula A: ``T = scale / (max(d) - min(d) + eps)``."""
    return options.temperature_scale / (float(d.max() - d.min()) + options.eps)


@temperature_rule("adaptive_b")
def _adaptive_b(d: Tensor, options: MatchingOptions) -> float:
    """The other reading of the paper: ``T = (max(d) - min(d)) / scale + eps``."""
    return float(d.max() - d.min()) / options.temperature_scale + options.eps


@temperature_rule("fixed")
def _fixed(d: Tensor, options: MatchingOptions) -> float:
    return options.fixed_temperature


def _sample(probabilities: Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probabilities, 1, generator=generator))


def _one_hot(window: range, chosen: list[int], weight: float) -> Tensor:
    probs = torch.zeros(len(window), dtype=torch.float64)
    for j in chosen:
        if j in window:
            probs[window.index(j)] = weight
    return probs


@strategy("multinomial", uses_distances=True)
def _multinomial(d, window, i_s, t_s, t_l, options, generator):
    """The paper: ``k ~ Multinomial(softmax(-d / T))`` with the configured temperature rule."""
    temperature = TEMPERATURES[options.temperature](d, options)
    probs = torch.softmax(-d / temperature, dim=0)
    return [window[_sample(probs, generator)]], [1.0], probs, temperature


@strategy("random", uses_distances=False)
def _random(d, window, i_s, t_s, t_l, options, generator):
    """Ablation: uniform over the window (over all teacher layers without ``search_range``)."""
    probs = torch.full((len(window),), 1.0 / len(window), dtype=torch.float64)
    return [window[_sample(probs, generator)]], [1.0], probs, float("nan")


@strategy("uniform", uses_distances=False)
def _uniform(d, window, i_s, t_s, t_l, options, generator):
    """Ablation: the fixed ``i_l = i_s·floor(t_l/t_s)`` (1-based), always inside the search window."""
    chosen = [(i_s + 1) * (t_l // t_s) - 1]
    return chosen, [1.0], _one_hot(window, chosen, 1.0), float("nan")


@strategy("bottom_k", uses_distances=True)
def _bottom_k(d, window, i_s, t_s, t_l, options, generator):
    """Ablation: the ``bottom_k`` smallest distances in the window (ties to the lower index), weights 1/k."""
    k = min(options.bottom_k, len(window))
    order = torch.sort(d, stable=True).indices[:k]
    chosen = sorted(window[int(p)] for p in order)
    return chosen, [1.0 / k] * k, _one_hot(window, chosen, 1.0 / k), float("nan")


def match_layers(distances: Tensor, options: MatchingOptions, generator: torch.Generator) -> Match:
    """Match student target layers to teacher target layers from ``distances [t_s, t_l]``.

    ``distances[i_s, j]`` is the verbalized KL between student layer ``i_s`` and teacher layer
    ``j`` (no grad needed); only entries inside the windows are read, so entries outside
    :func:`band_mask` may be ``inf`` or ``nan``. Random draws use only ``generator`` (a CPU
    generator), one ``torch.multinomial`` call per student layer for ``multinomial`` and ``random``.
    The strategy is looked up in :data:`STRATEGIES` (the paper's and the ablation baselines).
    """
    if distances.dim() != 2:
        raise ValueError(f"distances must be a [t_s, t_l] matrix, got shape {list(distances.shape)}.")
    t_s, t_l = distances.shape
    _check_sizes(t_s, t_l)
    if generator.device.type != "cpu":
        raise ValueError(f"match_layers needs a CPU torch.Generator, got one on {generator.device}.")
    distances = distances.detach().to("cpu", torch.float64)
    pick = STRATEGIES[options.strategy]
    match = Match([], [], [], [], [])
    start = 0
    for i_s in range(t_s):
        window = candidate_window(i_s, start, t_s, t_l, options)
        d = distances[i_s, window.start : window.stop]
        if pick.uses_distances and not torch.isfinite(d).all():
            bad = window[int(torch.nonzero(~torch.isfinite(d))[0])]
            raise ValueError(f"distance[{i_s}, {bad}] is not finite; every entry in a matching window needs a finite KL.")
        chosen, weights, probs, temperature = pick.pick(d, window, i_s, t_s, t_l, options, generator)
        match.indices.append(chosen)
        match.weights.append(weights)
        match.windows.append(window)
        match.probabilities.append(probs)
        match.temperatures.append(temperature)
        start = max(chosen) + 1
    return match
