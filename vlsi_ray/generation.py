"""Batched text generation from chat rows: greedy by default, per-row sampling, stop strings, streaming.

One :class:`ChatGenerator` serves the Ray Serve app (many concurrent requests batched into one
``generate`` call), the evaluation harness and the command line. Requests are chat rows in the
project's format (``{"id", "messages": HF chat JSON, "images": [PNG bytes]}``), collated by the same
:class:`~vlsi_ray.data.collate.ChatCollator` as training (prompt-only, left-padded), so a served
model sees exactly the token sequence it was trained on.

Each row has its own :class:`SamplingParams`. ``transformers``' ``generate`` runs greedy decoding
over the batch; :class:`_BatchState` is both its logits processor (rows with ``temperature > 0``
sample from their own seeded ``torch.Generator`` with temperature and nucleus ``top_p``, and the
sampled token is forced) and its stopping criteria (per-row ``max_tokens``, end-of-turn, stop
strings), and it reports each step's new text per row to an optional callback for streaming.
Streamed pieces concatenate exactly to the final text: text that could still turn into a stop
string, or an incomplete multi-byte character, is held back until it is decided.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.models.backbone import Backbone

#: ``on_step(deltas)`` gets one entry per row: ``None`` (nothing new) or ``(new_text, finish_reason)``,
#: where ``finish_reason`` is ``None`` while the row is still generating, else ``"stop"``/``"length"``.
StepCallback = Callable[[list[tuple[str, str | None] | None]], None]


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded (OpenAI semantics): ``temperature == 0`` is greedy. ``min_tokens`` (as vLLM's):
    the end-of-turn token is not chosen before that many tokens (stop strings still apply)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}.")


@dataclass
class Completion:
    """The decoded answer of one row, with OpenAI-style token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (max_tokens)
    batch_size: int = 1  # rows decoded together with this one, itself included
    token_ids: list[int] = field(default_factory=list)  # the generated tokens, the end-of-turn token excluded


@dataclass
class _Row:
    params: SamplingParams
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    sent: str = ""  # text already handed to the callback
    text: str = ""  # final text once done
    finish: str | None = None


class _BatchState:
    """Per-row sampling (a logits processor) and per-row stopping (a stopping criterion) for ``generate``."""

    def __init__(
        self, tokenizer, eos_token_id: int, params: Sequence[SamplingParams], device: torch.device, on_step: StepCallback | None
    ):
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.on_step = on_step
        self.rows = []
        for p in params:
            generator = None
            if p.temperature > 0:
                generator = torch.Generator(device=device)
                if p.seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(p.seed)
            self.rows.append(_Row(p, generator))

    # ---- LogitsProcessor: (input_ids [B, t], scores [B, V]) -> scores [B, V] ----------------------
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        for i, row in enumerate(self.rows):
            if row.finish is not None:
                continue
            if len(row.ids) < row.params.min_tokens:
                scores[i, self.eos_token_id] = float("-inf")
            if row.generator is None:
                continue
            token = sample_token(scores[i], row.params.temperature, row.params.top_p, row.generator)
            forced = torch.full_like(scores[i], float("-inf"))
            forced[token] = 0.0
            scores[i] = forced
        return scores

    # ---- StoppingCriteria: (input_ids [B, t], scores) -> done [B] bool -------------------------------
    def stop(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        deltas: list[tuple[str, str | None] | None] = []
        for i, row in enumerate(self.rows):
            if row.finish is not None:
                deltas.append(None)
                continue
            token = int(input_ids[i, -1])
            if token == self.eos_token_id:
                row.finish = "stop"
            else:
                row.ids.append(token)
            deltas.append(self._advance(row))
        if self.on_step is not None and any(d is not None for d in deltas):
            self.on_step(deltas)
        return torch.tensor([row.finish is not None for row in self.rows], device=input_ids.device)

    def _advance(self, row: _Row) -> tuple[str, str | None] | None:
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        cut = min((k for k in (text.find(s) for s in row.params.stop if s) if k >= 0), default=-1)
        if cut >= 0:
            text, row.finish = text[:cut], "stop"
        elif row.finish is None and len(row.ids) >= row.params.max_tokens:
            row.finish = "length"
        safe = text if row.finish is not None else _undecided_tail_removed(text, row.params.stop)
        if not safe.startswith(row.sent):  # a re-tokenised prefix changed: never retract sent text
            safe = row.sent
        delta, row.sent = safe[len(row.sent) :], safe
        if row.finish is not None:
            row.text = row.sent
        if not delta and row.finish is None:
            return None
        return delta, row.finish


def sample_token(scores: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from ``softmax(scores / temperature)`` restricted to the top-``top_p`` nucleus.

    ``scores [V]``. The nucleus is the smallest set of most likely tokens whose mass reaches
    ``top_p`` (always at least the most likely token).
    """
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _undecided_tail_removed(text: str, stops: Sequence[str]) -> str:
    """``text`` without a trailing partial character or a suffix that may still become a stop string."""
    if text.endswith("\ufffd"):  # a multi-byte character split across tokens
        text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold] if hold else text


class ChatGenerator:
    """Generate answers for chat rows with a :class:`Backbone` (any supported family)."""

    def __init__(self, backbone: Backbone, max_length: int | None = None):
        self.backbone = backbone
        self.collator = ChatCollator(backbone.tokenizer, backbone.image_processor, backbone.family, max_length, prompt_only=True)
        backbone.model.eval()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None, max_length: int | None = None
    ) -> ChatGenerator:
        """Load the model in local directory ``path`` (a run's checkpoint or an export)."""
        return cls(Backbone.from_pretrained(path, device=device, dtype=dtype), max_length)

    def prompt_tokens(self, row: dict) -> int:
        """Tokens of ``row``'s prompt (image placeholders included), as the model will see it."""
        return len(self.collator.encode(row, prompt_only=True)[0])

    @torch.no_grad()
    def generate(
        self,
        rows: Sequence[dict],
        params: Sequence[SamplingParams] | SamplingParams = SamplingParams(),
        on_step: StepCallback | None = None,
    ) -> list[Completion]:
        """Decode every row in one batched ``generate`` call; ``on_step`` streams each step's new text.

        ``rows``: ``B`` chat rows (a trailing assistant turn, if any, is dropped). Returns ``B``
        completions in order.
        """
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList  # noqa: PLC0415 - transformers loads on use, after the offline defaults

        if isinstance(params, SamplingParams):
            params = [params] * len(rows)
        if len(params) != len(rows):
            raise ValueError(f"got {len(rows)} rows but {len(params)} sampling params; pass one per row.")
        b = self.backbone
        batch = self.collator(list(rows))
        inputs = b.model_inputs(batch)
        state = _BatchState(b.tokenizer, b.eos_token_id, params, b.device, on_step)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return state.stop(input_ids, scores)

        b.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max(p.max_tokens for p in params),
            logits_processor=LogitsProcessorList([state]),
            stopping_criteria=StoppingCriteriaList([_Stop()]),
            pad_token_id=b.pad_token_id,
            eos_token_id=b.eos_token_id,
        )
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [
            Completion(
                row.text if row.finish else row.sent, int(n), len(row.ids), row.finish or "length", len(state.rows), list(row.ids)
            )
            for row, n in zip(state.rows, prompt_lengths)
        ]
