"""The paper's steps as per-batch objectives, shared by the in-process runner and the Ray actors.

Each objective owns the choice of trainable parameters for its step and maps one collated batch to
a :class:`StepOutput` (a scalar loss plus numbers to log). The training loop
(:mod:`vlsi_ray.method.loop`) and the Ray Train workers call the very same objects; for step 2 the
teacher is any callable ``batch -> TeacherSignal`` — a local model here, an actor client on Ray.

Response positions: position ``t`` predicts token ``t+1``, so the positions that carry a loss are
those whose *next* label is not -100. ``N`` below is the number of such positions in a batch.

Precision (:mod:`vlsi_ray.models.precision`): each objective makes the parameters it trains float32
master weights and runs its forward, heads included, under the backbone's autocast; the losses
upcast logits to float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from vlsi_ray.method.losses import per_token_kl, verbalized_ce, verbalized_kl
from vlsi_ray.method.matching import MatchingOptions, band_mask, match_layers
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.models.precision import keep_float32_masters
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.signals.teacher_signal import TeacherSignal, tail_sample_generator

#: Batch keys that are not model inputs.
NON_INPUT_KEYS = ("ids", "labels", "tasks", "answers")
#: Parameter groups fine-tuned in step 3 ("the LLM fully"; the vision tower stays as distilled).
SFT_GROUPS = ("embeddings", "language", "head", "projector")
#: Step 2's loss on the student's verbalized layers: KL to the matched teacher layers (paper),
#: cross-entropy on the ground truth, or none (final-layer-only KD): Table 4(b)/(d)'s ablations.
INTERMEDIATE_LOSSES = ("kl", "ce", "none")


@dataclass
class StepOutput:
    """One batch's loss and the numbers to log for it (floats or lists of ints)."""

    loss: Tensor
    metrics: dict = field(default_factory=dict)


def model_inputs(batch: dict) -> dict:
    """The subset of a collated batch that the backbone's forward takes."""
    return {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}


def response_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Positions that predict a response token, and those tokens.

    ``labels [B, T]`` (-100 outside the assistant response) -> ``mask [B, T]`` bool (last column
    False) and ``targets [N]`` int64, ordered as ``x[mask]`` orders positions.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask, labels[:, 1:][mask[:, :-1]]


def response_token_counts(labels: Tensor) -> list[int]:
    """Response positions per row of ``labels [B, T]``: how a batch's ``N`` signal tokens split into rows."""
    return response_positions(labels)[0].sum(dim=1).tolist()


def set_trainable(modules: Iterable[nn.Module], trainable: bool) -> None:
    """Set ``requires_grad`` on every parameter of ``modules``."""
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(trainable)


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` in ``modules`` (each counted once)."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def _vocab_slice(head: Callable[[Tensor], Tensor], vocab: int) -> Callable[[Tensor], Tensor]:
    """Restrict a head's logits to the teacher/student shared vocabulary prefix."""
    return lambda h: head(h)[..., :vocab]


class SFTObjective:
    """Next-token cross-entropy on the response (teacher pretraining, step 3, the SFT-only baseline).

    ``groups`` names the backbone's parameter groups to train (all of them when None); when LoRA
    is applied to the backbone, only the LoRA adapters train.
    """

    def __init__(self, backbone: Backbone, groups: Iterable[str] | None = None, chunk_size: int = 1024):
        self.backbone = backbone
        self.chunk_size = chunk_size
        set_trainable([backbone.model], False)
        if backbone.lora_active:  # SFT through LoRA: only the adapters train
            for name, p in backbone.model.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            wanted = set(groups) if groups is not None else None
            for name, params in backbone.parameter_groups().items():
                if wanted is None or name in wanted:
                    for _, p in params:
                        p.requires_grad_(True)
        keep_float32_masters(self.parameters())

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this step trains."""
        return trainable_parameters(self.backbone.model)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the trained model computes in (its optimizer's loss scaling depends on it)."""
        return self.backbone.compute_dtype

    def __call__(self, batch: dict) -> StepOutput:
        """Mean response-token cross-entropy of the final layer; logs ``loss``."""
        with self.backbone.autocast():
            out = self.backbone.forward(model_inputs(batch), logits=False)
            mask, targets = response_positions(batch["labels"])
            h = out.hidden_states[-1][mask]  # already final-normed
            loss = verbalized_ce(h, self.backbone.lm_head, targets, self.chunk_size).mean()
        return StepOutput(loss, {"loss": loss.item()})


class VerbalizationObjective:
    """Step 1: train one model's verb-FFNs with cross-entropy; backbone (and LM head) frozen.

    Loss = sum over target layers of the mean response-token cross-entropy of that layer's
    verbalizer (layers train independently: each verb-FFN only sees its own term).
    """

    def __init__(self, backbone: Backbone, verbalizers: Verbalizers, chunk_size: int = 1024):
        self.backbone = backbone
        self.verbalizers = verbalizers
        self.chunk_size = chunk_size
        set_trainable([backbone.model], False)
        set_trainable([verbalizers], True)
        keep_float32_masters(verbalizers.parameters())

    def parameters(self) -> list[nn.Parameter]:
        """The verb-FFN parameters."""
        return trainable_parameters(self.verbalizers)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the heads compute in."""
        return self.backbone.compute_dtype

    def __call__(self, batch: dict) -> StepOutput:
        """Sum of per-layer CE; logs ``loss`` and ``ce/<layer>``.

        The frozen backbone runs under ``no_grad``: it stores no activations, so gradient
        checkpointing has nothing to save here (the verbalizer heads are chunked and checkpointed).
        """
        with torch.no_grad():
            out = self.backbone.forward(model_inputs(batch), logits=False)
        mask, targets = response_positions(batch["labels"])
        device = next(self.verbalizers.parameters()).device
        targets = targets.to(device)
        loss = torch.zeros((), device=device)
        metrics = {}
        with self.backbone.autocast():
            for layer in self.verbalizers.layers:
                head = self.verbalizers.head(layer, self.backbone.final_norm, self.backbone.lm_head)
                ce = verbalized_ce(at_positions(out.hidden_states[layer], mask, device), head, targets, self.chunk_size).mean()
                metrics[f"ce/{layer}"] = ce.item()
                loss = loss + ce
        metrics["loss"] = loss.item()
        return StepOutput(loss, metrics)


def at_positions(hidden: Tensor, mask: Tensor, device: torch.device) -> Tensor:
    """``hidden [B, T, d]`` at ``mask [B, T]`` -> ``[N, d]`` on ``device``.

    A model spread over GPUs (``device_map``) leaves each block's output on that block's GPU, so the
    mask follows the hidden states and the result goes where the verbalizer heads are.
    """
    return hidden[mask.to(hidden.device)].to(device)


@torch.no_grad()
def teacher_signal(
    teacher: Backbone,
    verbalizers: Verbalizers,
    batch: dict,
    topk: int | None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    tail_samples: int = 0,
    seed: int = 0,
) -> TeacherSignal:
    """The teacher's verbalized distributions for one batch (step 2's teacher side).

    Returns a signal with ``t_l + 1`` layers over the ``N`` response positions: one per teacher
    target layer (in ``verbalizers.layers`` order) and the final layer last; top-k + tail when
    ``topk`` is set, dense otherwise. ``vocab_size`` restricts logits to the shared vocab prefix.
    ``tail_samples`` (top-k only) adds that many tail samples per token and layer, drawn for each
    row by :func:`tail_sample_generator` from ``seed`` and the row's id: the teacher actors
    (:class:`vlsi_ray.actors.teacher.TeacherWorker`) and the teacher cache call this very function,
    so they send the same samples for the same row, in any batch.
    """
    if tail_samples and "ids" not in batch:
        raise KeyError("teacher_signal with tail_samples needs the batch's row 'ids' to seed the draw; collate it with ChatCollator.")
    vocab = vocab_size or teacher.vocab_size
    out = teacher.forward(model_inputs(batch), logits=False)
    mask, _ = response_positions(batch["labels"])
    device = teacher.lm_head.weight.device
    layers = []
    with teacher.autocast():
        for layer in verbalizers.layers:
            head = verbalizers.head(layer, teacher.final_norm, teacher.lm_head)
            layers.append(head(at_positions(out.hidden_states[layer], mask, device))[..., :vocab].float())
        layers.append(teacher.lm_head(at_positions(out.hidden_states[-1], mask, device))[..., :vocab].float())
    logits = torch.stack(layers)
    if not tail_samples:
        return TeacherSignal.from_logits(logits, topk, temperature)
    # Each row's samples come from its own generator: the same whatever batch the row is in.
    ends = mask.sum(dim=1).cumsum(0).tolist()  # row ends among the N response tokens
    return TeacherSignal.cat_tokens([
        TeacherSignal.from_logits(logits[:, start:end], topk, temperature, tail_samples,
                                  tail_sample_generator(seed, [row_id], logits.device))
        for row_id, start, end in zip(batch["ids"], [0] + ends[:-1], ends)
    ])


class InteractionObjective:
    """Step 2: adaptive layer matching of the student's verbalizers to the teacher's, plus the last layer.

    ``teacher`` maps a batch to its :class:`TeacherSignal` (``t_l`` target layers + final). The
    student trains through LoRA (applied by the caller) plus its verb-FFNs; heads and vision frozen.
    Candidate KLs are computed without grad over the matching band; only the chosen pairs are
    recomputed with grad, so memory does not grow with the number of candidates. ``intermediate``
    (:data:`INTERMEDIATE_LOSSES`) and ``last_layer`` (``kl`` | ``ce`` | ``none``) pick the two terms.
    """

    def __init__(
        self,
        student: Backbone,
        verbalizers: Verbalizers,
        teacher: Callable[[dict], TeacherSignal],
        options: MatchingOptions,
        generator: torch.Generator,
        direction: str = "forward",
        kd_temperature: float = 1.0,
        last_layer: str = "kl",
        chunk_size: int = 1024,
        vocab_size: int | None = None,
        intermediate: str = "kl",
    ):
        if intermediate not in INTERMEDIATE_LOSSES:
            raise ValueError(f"intermediate must be one of {INTERMEDIATE_LOSSES}, got {intermediate!r}.")
        self.student = student
        self.verbalizers = verbalizers
        self.teacher = teacher
        self.options = options
        self.generator = generator
        self.direction = direction
        self.kd_temperature = kd_temperature
        self.last_layer = last_layer
        self.intermediate = intermediate
        self.chunk_size = chunk_size
        self.vocab = vocab_size or student.vocab_size
        if not student.lora_active:
            raise ValueError("step 2 trains the student through LoRA; call student.apply_lora(...) before building the objective.")
        groups = student.parameter_groups()
        for name in ("vision", "projector", "embeddings", "head"):
            for _, p in groups.get(name, []):
                p.requires_grad_(False)
        set_trainable([verbalizers], True)
        keep_float32_masters(self.parameters())  # peft already keeps LoRA adapters in float32

    def parameters(self) -> list[nn.Parameter]:
        """LoRA adapters and the student's verb-FFNs."""
        return trainable_parameters(self.student.model, self.verbalizers)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the student computes in."""
        return self.student.compute_dtype

    def _kl(self, hidden: Tensor, head: Callable, signal: TeacherSignal) -> Tensor:
        return verbalized_kl(hidden, head, signal, self.direction, self.kd_temperature, self.chunk_size).mean()

    @torch.no_grad()
    def _candidate_distances(self, hidden: list[Tensor], heads: list[Callable], signal: TeacherSignal) -> Tensor:
        """Mean KL ``[t_s, t_l]`` for every pair in the matching band (inf elsewhere), without grad.

        Logits of one student layer are computed ``chunk_size`` tokens at a time and compared with
        every candidate teacher layer, so memory holds one chunk of ``[chunk, V]`` logits at once.
        """
        t_s, t_l = len(hidden), signal.num_layers - 1
        band = band_mask(t_s, t_l, self.options)
        sums = torch.zeros(t_s, t_l, dtype=torch.float64, device=hidden[0].device)
        n = hidden[0].shape[0]
        for i in range(t_s):
            candidates = torch.nonzero(band[i]).flatten().tolist()
            for start in range(0, n, self.chunk_size):
                chunk = slice(start, min(n, start + self.chunk_size))
                logits = heads[i](hidden[i][chunk])
                for j in candidates:
                    part = signal.layer(j).tokens(chunk)
                    sums[i, j] += per_token_kl(part, logits, self.direction, self.kd_temperature).sum()
        distances = (sums / max(1, n)).float().cpu()
        distances[~band] = float("inf")
        return distances

    def __call__(self, batch: dict) -> StepOutput:
        """Matched intermediate KLs + last-layer term; logs per-layer KL and the matched indices."""
        signal = self.teacher(batch)
        with self.student.autocast():
            return self._loss(batch, signal)

    def _loss(self, batch: dict, signal: TeacherSignal) -> StepOutput:
        out = self.student.forward(model_inputs(batch), logits=False)
        mask, targets = response_positions(batch["labels"])
        layers = self.verbalizers.layers
        hidden = [out.hidden_states[layer][mask] for layer in layers]
        heads = [
            _vocab_slice(self.verbalizers.head(layer, self.student.final_norm, self.student.lm_head), self.vocab)
            for layer in layers
        ]
        t_s, t_l = len(layers), signal.num_layers - 1
        if signal.num_tokens != targets.numel():
            raise ValueError(
                f"teacher signal covers {signal.num_tokens} response tokens but the student batch has "
                f"{targets.numel()}; teacher and student must see the same collated batch."
            )
        loss = torch.zeros((), device=targets.device)
        metrics: dict = {}
        if self.intermediate == "kl":
            uses_distances = self.options.uses_distances
            distances = self._candidate_distances(hidden, heads, signal) if uses_distances else torch.zeros(t_s, t_l)
            match = match_layers(distances, self.options, self.generator)
            for i, (indices, weights) in enumerate(zip(match.indices, match.weights)):
                term = sum(w * self._kl(hidden[i], heads[i], signal.layer(j)) for j, w in zip(indices, weights))
                metrics[f"kl/{layers[i]}"] = term.item()
                loss = loss + term
            # Matched teacher target layers (0-based positions in the teacher's target list) per student target layer: Fig. 5's data.
            metrics["matched"] = [[int(j) for j in indices] for indices in match.indices]
        elif self.intermediate == "ce":  # Table 4(d)'s ablation: ground truth instead of the teacher's layers
            for i, layer in enumerate(layers):
                term = verbalized_ce(hidden[i], heads[i], targets, self.chunk_size).mean()
                metrics[f"ce/{layer}"] = term.item()
                loss = loss + term
        final = out.hidden_states[-1][mask]
        if self.last_layer == "kl":
            last = self._kl(final, _vocab_slice(self.student.lm_head, self.vocab), signal.layer(t_l))
            metrics["kl/last"] = last.item()
            loss = loss + last
        elif self.last_layer == "ce":
            last = verbalized_ce(final, self.student.lm_head, targets, self.chunk_size).mean()
            metrics["ce/last"] = last.item()
            loss = loss + last
        metrics["loss"] = loss.item()
        return StepOutput(loss, metrics)
