"""The one KL (and cross-entropy) implementation: training, matching, benchmarks and tests all use it.

Paper choices (VLSI_METHOD.md): forward KL(p_teacher ‖ p_student) at KD temperature 1, mean over
response tokens. No ``T²`` factor is applied for other temperatures; callers scale if they want it.

Vocabulary-sized logits dominate memory (152k entries per token), so :func:`verbalized_kl` and
:func:`verbalized_ce` apply the verbalizer head chunk by chunk under activation checkpointing:
only one chunk's ``[n, V]`` logits is alive at a time, in forward and in backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vlsi_ray.signals.teacher_signal import TeacherSignal

#: KL directions: forward = KL(teacher ‖ student) (paper), reverse = KL(student ‖ teacher).
DIRECTIONS = ("forward", "reverse")
#: Log-probability that stands in for an exact zero on the "q" side of KL(p ‖ q): the smallest
#: normal float32. An underflowed teacher probability (float16 storage, zero tail) then costs a
#: finite amount in the reverse KL instead of ``inf``.
LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values [B, T]`` where ``mask [B, T]`` is true; 0 when the mask is empty.

    Entries outside the mask are ignored even when they are ``nan`` or ``inf``.
    """
    if values.shape != mask.shape:
        raise ValueError(f"masked_mean needs values and mask of one shape, got {list(values.shape)} and {list(mask.shape)}.")
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp(min=1).to(total.dtype)


def token_mean(values: Tensor) -> Tensor:
    """Mean of per-token ``values [N]``; zero (still in the graph, so every rank's backward runs alike) when
    ``N == 0``: a batch without response tokens trains nothing instead of turning the loss into NaN."""
    return values.sum() / max(values.numel(), 1)


def select_positions(x: Tensor, mask: Tensor) -> Tensor:
    """Rows of ``x [B, T, ...]`` where ``mask [B, T]`` is true, as ``[N, ...]`` in row-major order."""
    if x.shape[: mask.dim()] != mask.shape or mask.dim() != 2:
        raise ValueError(
            f"select_positions needs mask [B, T] matching x's leading dims, got {list(mask.shape)} for {list(x.shape)}."
        )
    return x[mask.bool()]


def _kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dim from log-probs; ``p = 0`` bins contribute exactly 0 (and no nan grads)."""
    p_zero = torch.isneginf(p_log)
    p_safe = p_log.masked_fill(p_zero, 0.0)
    q_safe = q_log.masked_fill(torch.isneginf(q_log), LOG_FLOOR)
    return (p_safe.exp() * (p_safe - q_safe)).masked_fill(p_zero, 0.0).sum(-1)


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"KL direction must be one of {DIRECTIONS}, got {direction!r}.")


def _check_signal(teacher: TeacherSignal, student_logits: Tensor, temperature: float, what: str) -> None:
    if teacher.num_layers != 1:
        raise ValueError(f"{what} takes a single-layer signal, got {teacher.num_layers} layers; use signal.layer(j).")
    if student_logits.dim() != 2 or student_logits.shape[0] != teacher.num_tokens:
        raise ValueError(f"student_logits must be [N={teacher.num_tokens}, V], got {list(student_logits.shape)}.")
    if student_logits.shape[1] != teacher.vocab_size:
        raise ValueError(
            f"student vocabulary ({student_logits.shape[1]}) differs from the teacher signal's ({teacher.vocab_size}); "
            "slice both to the shared prefix."
        )
    if not math.isclose(temperature, teacher.temperature):
        raise ValueError(
            f"KD temperature {temperature} differs from the teacher signal's {teacher.temperature}; use the same for both."
        )


def per_token_kl(teacher: TeacherSignal, student_logits: Tensor, direction: str = "forward", temperature: float = 1.0) -> Tensor:
    """Per-token KL between a single-layer teacher signal (``N`` tokens) and ``student_logits [N, V]``; ``-> [N]``.

    Dense signal: exact KL(p_t ‖ p_s) (``forward``) or KL(p_s ‖ p_t) (``reverse``). Top-k signal:
    the same KL between the coarse-grained (k+1)-bin distributions: the teacher's top-k probs plus
    its tail mass, and the student's probs at the same ids plus its remaining mass (computed as a
    log-sum-exp over the other ids, so it stays accurate when it is tiny). That equals the exact KL
    when k = V and is never larger otherwise (data-processing inequality): it misses the KL inside
    the tail, ``P·KL(p'‖q')`` (forward) or ``Q·KL(q'‖p')`` (reverse), with ``P``, ``Q`` the tail
    masses and ``p'``, ``q'`` the distributions renormalized over the tail.

    A signal with tail samples (ids drawn from ``p'``) adds a Monte Carlo estimate of that term, so
    the value and the gradient are unbiased for the exact KL. With ``w = q'_i/p'_i`` at a drawn id
    it averages ``w - 1 - log w`` (forward, ``E[-log w]`` = KL(p'‖q')) or ``w·log w - w + 1``
    (reverse, importance-weighted); the ``±(w - 1)`` control variate has mean zero and makes every
    term non-negative. Empty draws (teacher or student tail mass 0) contribute 0; a zero student
    probability at a drawn id counts as ``LOG_FLOOR``, as in the (k+1)-bin KL.

    Student logits are divided by ``temperature``, which must be the signal's own temperature.
    Computed in float32 (float64 if the logits are float64); gradients flow to the student only.
    See :func:`candidate_kls` for many signals against one student's logits, without gradients.
    """
    _check_direction(direction)
    _check_signal(teacher, student_logits, temperature, "per_token_kl")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s_full = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    if teacher.is_dense:
        return _dense_kl(teacher, s_full, direction)
    ids = teacher.topk_ids[0].to(s_full.device)
    if teacher.k >= s_full.shape[-1]:  # the ids cover the vocabulary: nothing is left over
        s_tail = torch.full(ids.shape[:1], float("-inf"), dtype=dtype, device=s_full.device)
    else:
        s_tail = torch.logsumexp(s_full.scatter(-1, ids, float("-inf")), dim=-1)
    return _binned_kl(teacher, s_full.gather(-1, ids), s_tail, s_full.gather, direction, s_full.shape[-1])


@torch.no_grad()
def candidate_kls(
    signals: Sequence[TeacherSignal], student_logits: Tensor, direction: str = "forward", temperature: float = 1.0
) -> Tensor:
    """Per-token KLs ``[C, N]`` of one student's logits ``[N, V]`` against ``C`` single-layer signals, without grad.

    The values of ``per_token_kl(signals[c], student_logits, direction, temperature)`` (to float32's
    rounding), for the matching's candidate teacher layers: the vocabulary is normalised once, in a
    float64 log-sum-exp taken a slice of the vocabulary at a time, and each top-k candidate then costs
    ``O(k)`` (plus its tail draws): its student log-probs are gathered at its ids and the student's tail
    mass is the complement of their sum, exact to float64's rounding (``1e-16``) however small it is.
    A dense signal costs ``O(V)`` per candidate (its KL sums over the vocabulary).
    """
    _check_direction(direction)
    if not signals:
        return student_logits.new_zeros(0, student_logits.shape[0], dtype=torch.float32)
    for signal in signals:
        _check_signal(signal, student_logits, temperature, "candidate_kls")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    scaled = student_logits.to(dtype)  # as per_token_kl rounds them (no copy of float32 logits at temperature 1)
    if temperature != 1.0:
        scaled = scaled / temperature
    lse = _logsumexp64(scaled)  # [N] float64
    s_full = torch.log_softmax(scaled, dim=-1) if any(s.is_dense for s in signals) else None
    vocab, out = scaled.shape[-1], []

    def student_at(dim: int, ids: Tensor) -> Tensor:
        return (scaled.gather(dim, ids).double() - lse[:, None]).to(dtype)

    for signal in signals:
        if signal.is_dense:
            out.append(_dense_kl(signal, s_full, direction))
            continue
        ids = signal.topk_ids[0].to(scaled.device)
        top = scaled.gather(-1, ids).double() - lse[:, None]
        if signal.k >= vocab:
            s_tail = torch.full_like(lse, float("-inf"))
        else:  # log(1 - S), S = the top-k mass (float64: the complement is exact however small it is)
            s_tail = torch.log1p(-top.exp().sum(-1).clamp(max=1.0))
        out.append(_binned_kl(signal, top.to(dtype), s_tail.to(dtype), student_at, direction, vocab))
    return torch.stack([kl.float() for kl in out])


def _logsumexp64(logits: Tensor, slice_size: int = 16_384) -> Tensor:
    """``logsumexp(logits [N, V], -1)`` in float64 ``-> [N]``, a slice of ``slice_size`` vocabulary entries at a
    time (never a float64 copy of the whole ``[N, V]``)."""
    peak = logits.max(dim=-1).values.double()  # [N]
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros_like(peak)
    for start in range(0, logits.shape[-1], slice_size):
        total += (logits[:, start : start + slice_size].double() - peak[:, None]).exp().sum(-1)
    return peak + total.log()


def _dense_kl(teacher: TeacherSignal, s_full: Tensor, direction: str) -> Tensor:
    """Exact per-token KL of a dense single-layer signal and the student's log-probs ``s_full [N, V]``; ``-> [N]``."""
    t_log = teacher.logprobs[0].to(device=s_full.device, dtype=s_full.dtype).detach()
    return _kl(t_log, s_full) if direction == "forward" else _kl(s_full, t_log)


def _binned_kl(
    teacher: TeacherSignal,
    s_top: Tensor,
    s_tail: Tensor,
    student_at: Callable[[int, Tensor], Tensor],
    direction: str,
    vocab: int,
) -> Tensor:
    """The (k+1)-bin KL of a top-k signal (plus its sampled tail term) ``-> [N]``, given the student's log-probs at
    the signal's ids ``s_top [N, k]``, its log tail mass ``s_tail [N]`` and ``student_at(-1, ids)``: its log-probs
    at other ids (the tail draws), as ``Tensor.gather`` of its full log-probs would give them."""
    dtype, device = s_top.dtype, s_top.device
    t_tail = teacher.tail_logmass[0].to(device=device, dtype=dtype).detach()
    t_log = torch.cat([teacher.topk_logprobs[0].to(device=device, dtype=dtype), t_tail[:, None]], dim=-1).detach()
    s_log = torch.cat([s_top, s_tail[:, None]], dim=-1)
    kl = _kl(t_log, s_log) if direction == "forward" else _kl(s_log, t_log)
    if not teacher.tail_samples or teacher.k >= vocab:
        return kl
    return kl + _sampled_tail_kl(teacher, student_at, t_tail, s_tail, direction)


def _sampled_tail_kl(
    teacher: TeacherSignal, student_at: Callable[[int, Tensor], Tensor], t_tail: Tensor, s_tail: Tensor, direction: str
) -> Tensor:
    """Monte Carlo estimate of the KL inside the tail (see :func:`per_token_kl`); ``-> [N]``.

    ``student_at(-1, ids)`` gives the student's log-probs at ``ids [N, m]``; ``t_tail``, ``s_tail [N]`` are the
    teacher's and the student's log tail masses; the teacher's draws are ``teacher.tail_sample_ids``/``_logprobs
    [1, N, m]``.
    """
    draw = teacher.tail_sample_ids[0].to(s_tail.device)
    t_draw = teacher.tail_sample_logprobs[0].to(device=s_tail.device, dtype=s_tail.dtype).detach()
    # A student with no tail mass has no q' (and Q·KL(q'‖p') = 0): its draws count as empty too.
    empty = torch.isneginf(t_draw) | (torch.isneginf(t_tail) | torch.isneginf(s_tail))[:, None]
    # A zero student probability at a drawn id stands at LOG_FLOOR: forward, as on the q side of _kl;
    # reverse, w ~ 0 then gives the w -> 0 limit of its term (1) without the nan of 0·log 0.
    s_draw = student_at(-1, draw)
    s_draw = s_draw.masked_fill(torch.isneginf(s_draw), LOG_FLOOR)
    # log w = log q'_i - log p'_i; filling empty draws before exp keeps values and gradients finite.
    log_w = (s_draw - s_tail[:, None]) - (t_draw - t_tail[:, None])
    log_w = log_w.masked_fill(empty, 0.0)
    if direction == "forward":
        terms, mass = torch.expm1(log_w) - log_w, t_tail.exp()
    else:
        terms, mass = log_w.exp() * log_w - torch.expm1(log_w), s_tail.exp()
    drawn = (~empty).sum(-1).clamp(min=1).to(terms.dtype)
    return mass * terms.masked_fill(empty, 0.0).sum(-1) / drawn


def _chunked(piece: Callable[[slice], Tensor], n: int, chunk_size: int | None) -> Tensor:
    """``cat([piece(s) for s in chunks of range(n)])``, each chunk under activation checkpointing."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}.")
    size = n if chunk_size is None else chunk_size
    outs = []
    for start in range(0, n, max(1, size)):
        sl = slice(start, min(start + size, n))
        if torch.is_grad_enabled():
            # Non-reentrant checkpointing also recomputes through parameters the head closes over.
            outs.append(checkpoint(piece, sl, use_reentrant=False))
        else:
            outs.append(piece(sl))
    return torch.cat(outs)


def verbalized_kl(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    teacher: TeacherSignal,
    direction: str = "forward",
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-token KL between ``teacher`` (one layer, ``N`` tokens) and ``head(hidden)``; ``hidden [N, d] -> [N]``.

    ``head`` maps ``[n, d] -> [n, V]`` (verb-FFN + final norm + LM head). It runs on ``chunk_size``
    tokens at a time (all ``N`` when None) under ``torch.utils.checkpoint``, so only one chunk's
    logits is ever alive; values and gradients equal the unchunked
    ``per_token_kl(teacher, head(hidden), direction, temperature)``.
    """
    _check_direction(direction)
    if hidden.dim() != 2 or hidden.shape[0] != teacher.num_tokens:
        raise ValueError(f"hidden must be [N={teacher.num_tokens}, d] to match the teacher signal, got {list(hidden.shape)}.")
    if hidden.shape[0] == 0:  # through the head, so that a loss over no token still reaches its parameters
        return head(hidden).sum(-1).float()

    def piece(sl: slice) -> Tensor:
        return per_token_kl(teacher.tokens(sl), head(hidden[sl]), direction, temperature)

    return _chunked(piece, hidden.shape[0], chunk_size)


def verbalized_ce(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, chunk_size: int | None = None) -> Tensor:
    """Per-token next-token cross-entropy of ``head(hidden)``; ``hidden [N, d]``, ``targets [N]`` int64 ``-> [N]``.

    Targets equal to -100 give 0. Chunked and checkpointed like :func:`verbalized_kl`; computed in
    float32 at least.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"verbalized_ce needs hidden [N, d] and targets [N], got {list(hidden.shape)} and {list(targets.shape)}."
        )
    if targets.is_floating_point():
        raise ValueError(f"verbalized_ce targets must be integer token ids, got {targets.dtype}.")
    if hidden.shape[0] == 0:  # through the head, so that a loss over no token still reaches its parameters
        return head(hidden).sum(-1).float()

    def piece(sl: slice) -> Tensor:
        logits = head(hidden[sl])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, targets[sl].long(), reduction="none", ignore_index=-100)

    return _chunked(piece, hidden.shape[0], chunk_size)
