"""What the teacher sends the student: verbalized log-probabilities, dense or top-k + tail.

A :class:`TeacherSignal` holds the teacher's next-token log-probabilities for ``L`` layers (its
verbalized target layers, usually followed by its final layer) at ``N`` response tokens, in one of
two forms:

- dense: ``logprobs [L, N, V]``;
- top-k + tail: ``topk_logprobs [L, N, k]``, ``topk_ids [L, N, k]`` (int64) and
  ``tail_logmass [L, N]`` = log of the probability outside the top k (``-inf`` when it is zero);
  optionally with ``m`` tail samples: ``tail_sample_ids [L, N, m]`` drawn with replacement from the
  teacher's distribution restricted to the tail, and their log-probs ``tail_sample_logprobs``.

Dense verbalized logits do not scale across actors (~0.62 GB per layer per 2048-token sample for a
152k vocabulary in bf16); top-64 + tail is ~0.4 KB per token per layer. The KL between the
coarse-grained (k+1)-bin distributions is computed by :func:`vlsi_ray.method.losses.per_token_kl`;
it misses the KL inside the tail: at k = 64 and V = 152k, 1.5% of the KL on Zipf(2) rows (1% tail
mass) and 12% on flatter Zipf(1.5) rows (9% tail mass; docs/BENCHMARKS.md). The tail samples
estimate that part without bias, for 6 bytes each in float16.

:meth:`TeacherSignal.to_numpy` / :meth:`TeacherSignal.from_numpy` is the codec for the Ray object
store: log-probs in float16 or float32, ids in int32, the tail always in float32.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

#: Storage dtypes the numpy codec accepts for the log-probs.
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
_TAIL_DTYPE = np.float32
_ID_DTYPE = np.int32


def wire_bytes_per_token_per_layer(topk: int | None, tail_samples: int, storage: str, vocab_size: int) -> float:
    """Bytes per (token, layer) of an encoded signal (:meth:`TeacherSignal.to_numpy`): dense ``V·s``;
    top-k ``(k + m)·(s + 4) + 4`` (log-probs of ``s`` bytes and int32 ids for the top ``k`` and the
    ``m`` tail samples, float32 tail), ``s`` = 2 for float16 and 4 for float32 ``storage``."""
    s = np.dtype(_storage_dtype(storage)).itemsize
    if topk is None:
        return float(vocab_size * s)
    return float((topk + tail_samples) * (s + np.dtype(_ID_DTYPE).itemsize) + np.dtype(_TAIL_DTYPE).itemsize)


@dataclass
class TeacherSignal:
    """Teacher log-probabilities for ``L`` layers at ``N`` tokens, dense or top-k + tail.

    Give either ``logprobs [L, N, V]`` (dense) or all of ``topk_logprobs [L, N, k]``,
    ``topk_ids [L, N, k]`` (distinct ids per token, any integer dtype, stored as int64),
    ``tail_logmass [L, N]`` and ``vocab_size``, optionally with ``tail_sample_ids [L, N, m]`` (ids
    outside the top k, drawn i.i.d. from the teacher's tail distribution) and
    ``tail_sample_logprobs [L, N, m]`` (their teacher log-probs; ``-inf`` marks an empty draw, used
    where the tail has no mass). ``temperature`` is the KD temperature the logits were divided by;
    the student side must use the same one.
    """

    logprobs: Tensor | None = None
    topk_logprobs: Tensor | None = None
    topk_ids: Tensor | None = None
    tail_logmass: Tensor | None = None
    vocab_size: int | None = None
    temperature: float = 1.0
    tail_sample_ids: Tensor | None = None
    tail_sample_logprobs: Tensor | None = None

    def __post_init__(self) -> None:
        sparse = (self.topk_logprobs, self.topk_ids, self.tail_logmass)
        if self.logprobs is not None:
            if any(t is not None for t in sparse + (self.tail_sample_ids, self.tail_sample_logprobs)):
                raise ValueError(
                    "TeacherSignal takes either logprobs (dense) or topk_* + tail_logmass (+ tail_sample_*), not both."
                )
            if self.logprobs.dim() != 3 or not self.logprobs.is_floating_point():
                raise ValueError(f"TeacherSignal.logprobs must be a float tensor [L, N, V], got {_describe(self.logprobs)}.")
            vocab = self.logprobs.shape[-1]
            if self.vocab_size is not None and self.vocab_size != vocab:
                raise ValueError(f"TeacherSignal.vocab_size={self.vocab_size} does not match logprobs' last dim {vocab}.")
            self.vocab_size = int(vocab)
        else:
            if any(t is None for t in sparse):
                raise ValueError("TeacherSignal needs logprobs, or all of topk_logprobs, topk_ids and tail_logmass.")
            lp, ids, tail = sparse
            if lp.dim() != 3 or not lp.is_floating_point():
                raise ValueError(f"TeacherSignal.topk_logprobs must be a float tensor [L, N, k], got {_describe(lp)}.")
            if ids.shape != lp.shape or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(f"TeacherSignal.topk_ids must be an integer tensor {list(lp.shape)}, got {_describe(ids)}.")
            if tail.shape != lp.shape[:2] or not tail.is_floating_point():
                raise ValueError(
                    f"TeacherSignal.tail_logmass must be a float tensor {list(lp.shape[:2])}, got {_describe(tail)}."
                )
            if self.vocab_size is None or self.vocab_size < lp.shape[-1]:
                raise ValueError(f"TeacherSignal.vocab_size must be given and at least k={lp.shape[-1]}, got {self.vocab_size}.")
            self.vocab_size = int(self.vocab_size)
            if ids.dtype != torch.int64:
                self.topk_ids = ids.long()  # torch.gather wants int64 indices
            self._check_tail_samples()
        if not self.temperature > 0:
            raise ValueError(f"TeacherSignal.temperature must be positive, got {self.temperature}.")

    def _check_tail_samples(self) -> None:
        ids, lp = self.tail_sample_ids, self.tail_sample_logprobs
        if ids is None and lp is None:
            return
        if ids is None or lp is None:
            raise ValueError("TeacherSignal needs both tail_sample_ids and tail_sample_logprobs, or neither.")
        L, N = self.topk_logprobs.shape[:2]
        if lp.dim() != 3 or lp.shape[:2] != (L, N) or not lp.is_floating_point():
            raise ValueError(f"TeacherSignal.tail_sample_logprobs must be a float tensor [{L}, {N}, m], got {_describe(lp)}.")
        if ids.shape != lp.shape or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"TeacherSignal.tail_sample_ids must be an integer tensor {list(lp.shape)}, got {_describe(ids)}.")
        if ids.dtype != torch.int64:
            self.tail_sample_ids = ids.long()

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_logits(
        cls,
        logits: Tensor,
        k: int | None,
        temperature: float = 1.0,
        tail_samples: int = 0,
        generator: torch.Generator | None = None,
    ) -> TeacherSignal:
        """Build a signal from raw teacher logits ``[L, N, V]``.

        ``k=None`` keeps the dense log-probs; an integer ``k`` keeps the top ``min(k, V)`` (so
        ``k >= V`` is the exact distribution in top-k form). Logits are divided by ``temperature``
        before the log-softmax, computed in float32 (float64 if the logits are float64). The tail
        is the log-sum-exp of the log-probs outside the top k, so it is exact (no ``1 - sum``
        cancellation) and exactly ``-inf`` when the top k cover the vocabulary.

        ``tail_samples = m > 0`` (top-k only) also draws ``m`` ids per token with replacement from
        the teacher's distribution renormalized over the tail (``generator`` seeds the draw; it must
        live on the logits' device: training uses :func:`tail_sample_generator`) and keeps them
        with their log-probs: ``tail_sample_ids`` and ``tail_sample_logprobs [L, N, m]``. Tokens whose tail has no mass get empty draws (id 0,
        log-prob ``-inf``); with ``k >= V`` no samples are kept, so the signal stays exact.
        """
        if logits.dim() != 3:
            raise ValueError(
                f"from_logits expects logits [L, N, V], got shape {list(logits.shape)}; add a layer dim with unsqueeze(0)."
            )
        if k is not None and k < 1:
            raise ValueError(f"from_logits needs k >= 1 or None for dense, got k={k}.")
        if not temperature > 0:
            raise ValueError(f"from_logits needs a positive temperature, got {temperature}.")
        if tail_samples < 0 or (tail_samples and k is None):
            raise ValueError(f"from_logits takes tail_samples >= 0, and only with a top-k signal, got {tail_samples} with k={k}.")
        dtype = torch.promote_types(logits.dtype, torch.float32)
        vocab = logits.shape[-1]
        if k is None:
            return cls(logprobs=torch.log_softmax(logits.to(dtype) / temperature, dim=-1), temperature=temperature)
        k = min(int(k), vocab)
        sample = tail_samples > 0 and k < vocab
        values, ids, tails, sample_ids, sample_lps = [], [], [], [], []
        for layer_logits in logits:  # one layer at a time bounds the extra [N, V] buffers to two
            lp = torch.log_softmax(layer_logits.to(dtype) / temperature, dim=-1)
            top, idx = torch.topk(lp, k, dim=-1, sorted=True)
            rest = lp.scatter(-1, idx, float("-inf"))
            tail = torch.logsumexp(rest, dim=-1)
            values.append(top)
            ids.append(idx)
            tails.append(tail)
            if sample:
                draw, draw_lp = _draw_from_tail(lp, rest, tail, tail_samples, generator)
                sample_ids.append(draw)
                sample_lps.append(draw_lp)
        return cls(
            topk_logprobs=torch.stack(values),
            topk_ids=torch.stack(ids),
            tail_logmass=torch.stack(tails),
            vocab_size=vocab,
            temperature=temperature,
            tail_sample_ids=torch.stack(sample_ids) if sample else None,
            tail_sample_logprobs=torch.stack(sample_lps) if sample else None,
        )

    @classmethod
    def from_topk(cls, topk_logprobs: Tensor, topk_ids: Tensor, vocab_size: int, temperature: float = 1.0) -> TeacherSignal:
        """Build a top-k signal when only the top-k log-probs ``[L, N, k]`` are known (e.g. from a server).

        The tail is ``log(1 - sum(exp(topk_logprobs)))`` via ``log1p(-exp(logsumexp))`` in float64,
        clamped at zero mass (``-inf``), which then contributes exactly 0 to the forward KL.
        """
        return cls(
            topk_logprobs=topk_logprobs,
            topk_ids=topk_ids,
            tail_logmass=tail_logmass_from_topk(topk_logprobs).to(torch.promote_types(topk_logprobs.dtype, torch.float32)),
            vocab_size=vocab_size,
            temperature=temperature,
        )

    @classmethod
    def stack(cls, signals: Sequence[TeacherSignal]) -> TeacherSignal:
        """Concatenate signals of the same form, tokens and vocabulary along the layer dim."""
        return cls._concat(signals, dim=0, shared="num_tokens", what="stack")

    @classmethod
    def cat_tokens(cls, signals: Sequence[TeacherSignal]) -> TeacherSignal:
        """Concatenate signals of the same form, layers and vocabulary along the token dim (rows of a batch)."""
        return cls._concat(signals, dim=1, shared="num_layers", what="cat_tokens")

    @classmethod
    def _concat(cls, signals: Sequence[TeacherSignal], dim: int, shared: str, what: str) -> TeacherSignal:
        if not signals:
            raise ValueError(f"TeacherSignal.{what} needs at least one signal.")
        first = signals[0]

        def key(s: TeacherSignal) -> tuple:
            return s.is_dense, s.k, s.tail_samples, getattr(s, shared), s.vocab_size, s.temperature

        if any(key(s) != key(first) for s in signals[1:]):
            other = "tokens" if shared == "num_tokens" else "layers"
            raise ValueError(
                f"TeacherSignal.{what} needs signals with the same form, k, tail_samples, {other}, vocab_size and temperature."
            )
        names = [name for name, t in first._named_tensors().items() if t is not None]
        return replace(first, **{name: torch.cat([getattr(s, name) for s in signals], dim=dim) for name in names})

    @property
    def is_dense(self) -> bool:
        """True for the dense form."""
        return self.logprobs is not None

    @property
    def k(self) -> int | None:
        """Entries kept per token (None for dense)."""
        return None if self.is_dense else int(self.topk_logprobs.shape[-1])

    @property
    def tail_samples(self) -> int:
        """Tail samples kept per token (0 when there are none)."""
        return 0 if self.tail_sample_ids is None else int(self.tail_sample_ids.shape[-1])

    @property
    def num_layers(self) -> int:
        """``L``."""
        return int(self._main.shape[0])

    @property
    def num_tokens(self) -> int:
        """``N``."""
        return int(self._main.shape[1])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self._main.device

    @property
    def _main(self) -> Tensor:
        return self.logprobs if self.is_dense else self.topk_logprobs

    def _named_tensors(self) -> dict[str, Tensor | None]:
        if self.is_dense:
            return {"logprobs": self.logprobs}
        return {
            "topk_logprobs": self.topk_logprobs,
            "topk_ids": self.topk_ids,
            "tail_logmass": self.tail_logmass,
            "tail_sample_ids": self.tail_sample_ids,
            "tail_sample_logprobs": self.tail_sample_logprobs,
        }

    def _map(self, fn) -> TeacherSignal:
        """Apply ``fn`` to every tensor (all have the layer dim first, then tokens)."""
        return replace(self, **{name: fn(t) for name, t in self._named_tensors().items() if t is not None})

    def select(self, indices: Sequence[int]) -> TeacherSignal:
        """The layers at ``indices`` (0-based, in that order)."""
        index = list(indices)
        for j in index:
            if not -self.num_layers <= j < self.num_layers:
                raise IndexError(f"layer {j} is out of range for a signal with {self.num_layers} layers.")
        return self._map(lambda t: t[index])

    def layer(self, j: int) -> TeacherSignal:
        """Layer ``j`` alone, as a signal with ``L = 1``."""
        return self.select([j])

    def tokens(self, index: slice | Tensor) -> TeacherSignal:
        """The tokens at ``index`` (a slice, an index tensor or a bool mask over ``N``)."""
        return self._map(lambda t: t[:, index])

    def to(self, device: torch.device | str) -> TeacherSignal:
        """Move every tensor to ``device`` (dtypes unchanged). Host tensors go to a GPU through pinned memory
        without waiting for the copy (a copy from pageable memory makes the host wait for the device)."""
        device = torch.device(device)
        if device.type != "cuda":
            return self._map(lambda t: t.to(device))
        return self._map(lambda t: t.pin_memory().to(device, non_blocking=True) if t.device.type == "cpu" else t.to(device))

    # ----------------------------------------------------------------------------- codec and size
    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors as they are now (torch dtypes: int64 ids)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[Tensor]:
        return [t for t in self._named_tensors().values() if t is not None]

    def bytes_per_token_per_layer(self, storage: str | None = None) -> float:
        """Bytes per (token, layer): as held now when ``storage`` is None, else in :meth:`to_numpy`'s
        layout (:func:`wire_bytes_per_token_per_layer`)."""
        if storage is None:
            return self.nbytes / max(1, self.num_layers * self.num_tokens)
        return wire_bytes_per_token_per_layer(self.k, self.tail_samples, storage, self.vocab_size)

    def to_numpy(self, storage: str = "float16") -> dict[str, np.ndarray]:
        """Encode for the Ray object store: log-probs in ``storage`` dtype, ids int32, tail float32.

        Keys: ``logprobs`` (dense) or ``topk_logprobs``, ``topk_ids``, ``tail_logmass`` (and
        ``tail_sample_logprobs``, ``tail_sample_ids`` when the signal has tail samples); plus 0-d
        ``vocab_size`` (int64) and ``temperature`` (float64). float16 turns log-probs below -65504
        into ``-inf`` (zero probability), which the KL treats as such.
        """
        dtype = _storage_dtype(storage)
        out: dict[str, np.ndarray] = {
            "vocab_size": np.array(self.vocab_size, dtype=np.int64),
            "temperature": np.array(self.temperature, dtype=np.float64),
        }
        if self.is_dense:
            out["logprobs"] = _numpy(self.logprobs).astype(dtype)
            return out
        if self.vocab_size > np.iinfo(_ID_DTYPE).max:
            raise ValueError(f"vocab_size={self.vocab_size} does not fit the codec's int32 ids.")
        out["topk_logprobs"] = _numpy(self.topk_logprobs).astype(dtype)
        out["topk_ids"] = _numpy(self.topk_ids).astype(_ID_DTYPE)
        out["tail_logmass"] = _numpy(self.tail_logmass).astype(_TAIL_DTYPE)
        if self.tail_samples:
            out["tail_sample_logprobs"] = _numpy(self.tail_sample_logprobs).astype(dtype)
            out["tail_sample_ids"] = _numpy(self.tail_sample_ids).astype(_ID_DTYPE)
        return out

    @classmethod
    def from_numpy(cls, d: dict[str, np.ndarray]) -> TeacherSignal:
        """Decode :meth:`to_numpy`'s dict (log-probs keep their storage dtype; ids become int64)."""
        missing = {"vocab_size", "temperature"} - d.keys()
        if missing:
            raise ValueError(f"encoded TeacherSignal lacks {sorted(missing)}; it must come from TeacherSignal.to_numpy.")
        meta = dict(vocab_size=int(d["vocab_size"]), temperature=float(d["temperature"]))
        if "logprobs" in d:
            return cls(logprobs=_tensor(d["logprobs"]), **meta)
        keys = ("topk_logprobs", "topk_ids", "tail_logmass")
        if any(key not in d for key in keys):
            raise ValueError(f"encoded TeacherSignal needs 'logprobs' or all of {list(keys)}, got {sorted(d)}.")
        if ("tail_sample_ids" in d) != ("tail_sample_logprobs" in d):
            raise ValueError("encoded TeacherSignal needs both 'tail_sample_ids' and 'tail_sample_logprobs', or neither.")
        samples = {}
        if "tail_sample_ids" in d:
            samples = dict(
                tail_sample_ids=torch.from_numpy(np.asarray(d["tail_sample_ids"]).astype(np.int64)),
                tail_sample_logprobs=_tensor(d["tail_sample_logprobs"]),
            )
        return cls(
            topk_logprobs=_tensor(d["topk_logprobs"]),
            topk_ids=torch.from_numpy(np.asarray(d["topk_ids"]).astype(np.int64)),
            tail_logmass=_tensor(d["tail_logmass"]),
            **meta,
            **samples,
        )


def tail_logmass_from_topk(topk_logprobs: Tensor) -> Tensor:
    """``log(1 - sum(exp(topk_logprobs)))`` over the last dim, ``[..., k] -> [...]``, in float64.

    Uses ``log(-expm1(logsumexp))`` (= ``log1p(-exp(lse))``), which keeps small tails accurate;
    a top-k mass that rounds to >= 1 gives zero tail mass, i.e. ``-inf``.
    """
    lse = torch.logsumexp(topk_logprobs.double(), dim=-1).clamp(max=0.0)
    return torch.log(-torch.expm1(lse))


def tail_sample_generator(seed: int, row_ids: Sequence, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator that draws tail samples for ``row_ids``: seeded by ``seed`` and the ids, in order.

    Training draws each row's samples with the generator of that row alone
    (:func:`vlsi_ray.method.steps.teacher_signal`), so the in-process teacher, a teacher actor (a
    restarted one too) and the offline teacher cache send the same samples for a row, whatever batch
    it came in; another row or another seed gets other samples. The seed is a BLAKE2b hash (Python's ``hash`` of a str differs between
    processes). ``device`` must be the teacher logits' device.
    """
    key = json.dumps([int(seed), [str(i) for i in row_ids]]).encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)  # < 2**63


def _draw_from_tail(lp: Tensor, rest: Tensor, tail: Tensor, m: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``m`` ids per row drawn with replacement from ``exp(rest - tail)`` and their log-probs in ``lp``.

    ``lp [N, V]`` log-probs, ``rest [N, V]`` the same with the top k at ``-inf`` (overwritten unless
    it requires grad), ``tail [N]`` its log-sum-exp; returns ids ``[N, m]`` (int64) and log-probs
    ``[N, m]``. Rows with no tail mass get empty draws: id 0 and log-prob ``-inf``.
    """
    empty = torch.isneginf(tail)
    if rest.requires_grad:  # autograd saved ``rest`` for the tail's log-sum-exp: draw from a copy
        rest, tail = rest.detach().clone(), tail.detach()
    # Renormalizing in log space first keeps tails of 1e-40 drawable in float32.
    probs = rest.sub_(tail[:, None]).exp_().masked_fill_(empty[:, None], 0.0)
    probs[:, 0].masked_fill_(empty, 1.0)  # multinomial rejects all-zero rows
    draw = torch.multinomial(probs, m, replacement=True, generator=generator)
    draw = draw.masked_fill(empty[:, None], 0)
    return draw, lp.gather(-1, draw).masked_fill(empty[:, None], float("-inf"))


def _storage_dtype(storage: str) -> type:
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}.")
    return STORAGE_DTYPES[storage]


def _numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def _tensor(a: np.ndarray) -> Tensor:
    a = np.asarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # object-store arrays are read-only


def _describe(t: Tensor) -> str:
    return f"{t.dtype} with shape {list(t.shape)}"
