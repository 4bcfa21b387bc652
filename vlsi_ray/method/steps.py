"""The paper's steps as per-batch objectives, shared by the in-process runner and the Ray actors.

Each objective owns the choice of trainable parameters for its step and maps one collated batch to
a :class:`StepOutput` (a scalar loss plus numbers to log). The training loop
(:mod:`vlsi_ray.method.loop`) and the Ray Train workers call the very same objects; for step 2 the
teacher is any callable ``batch -> TeacherSignal`` (:func:`vlsi_ray.teacher.sources.teacher_source`:
a model in this process, the Ray teacher pool, or the offline cache).

Response positions: position ``t`` predicts token ``t+1``, so the positions that carry a loss are
those whose *next* label is not -100. ``N`` below is the number of such positions in a batch.

Precision (:mod:`vlsi_ray.models.precision`): each objective makes the parameters it trains float32
master weights and runs its forward, heads included, under the backbone's autocast; the losses
upcast logits to float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vlsi_ray.method.losses import DIRECTIONS, candidate_kls, token_mean, verbalized_ce, verbalized_kl
from vlsi_ray.method.matching import MatchingOptions, band_mask, match_layers
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.models.precision import keep_float32_masters
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.signals.teacher_signal import TeacherSignal

#: Batch keys that are not model inputs.
NON_INPUT_KEYS = ("ids", "labels", "tasks", "answers")
#: Parameter groups fine-tuned in step 3 ("the LLM fully"; the vision tower stays as distilled).
SFT_GROUPS = ("embeddings", "language", "head", "projector")


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


def response_index(labels: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`response_positions` as flat indices: ``labels [B, T]`` -> ``index [N]`` into ``B × T`` (the
    positions ``x[mask]`` takes, in its order) and ``targets [N]``.

    Finding the positions is the one point where the host waits for the device (``N`` decides shapes);
    :func:`at_index` then takes them from every layer without another wait, where a boolean mask would
    wait once per layer.
    """
    following = torch.full_like(labels, -100)  # each position's next token: what it predicts
    following[:, :-1] = labels[:, 1:]
    index = (following != -100).reshape(-1).nonzero().squeeze(1)
    return index, following.reshape(-1).index_select(0, index)


def at_index(hidden: Tensor, index: Tensor, device: torch.device) -> Tensor:
    """``hidden [B, T, d]`` at the flat positions ``index [N]`` (:func:`response_index`) -> ``[N, d]`` on
    ``device`` (where the heads are: a model spread over GPUs leaves each block's output on its GPU)."""
    return hidden.flatten(0, 1).index_select(0, index.to(hidden.device)).to(device)


def host_metrics(metrics: dict) -> dict:
    """``metrics`` with every tensor value (0-d, on the device) as a float, fetched in one transfer: one
    wait for the device per call instead of one per ``.item()``."""
    keys = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    if not keys:
        return metrics
    values = torch.stack([metrics[k].detach().float() for k in keys]).tolist()
    return {**metrics, **dict(zip(keys, values))}


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
            index, targets = response_index(batch["labels"])
            h = at_index(out.hidden_states[-1], index, out.hidden_states[-1].device)  # already final-normed
            loss = token_mean(verbalized_ce(h, self.backbone.lm_head, targets, self.chunk_size))
        return StepOutput(loss, host_metrics({"loss": loss}))


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
        index, targets = response_index(batch["labels"])
        device = next(self.verbalizers.parameters()).device
        targets = targets.to(device)
        loss = torch.zeros((), device=device)
        metrics = {}
        with self.backbone.autocast():
            for layer in self.verbalizers.layers:
                head = self.verbalizers.head(layer, self.backbone.final_norm, self.backbone.lm_head)
                ce = token_mean(verbalized_ce(at_index(out.hidden_states[layer], index, device), head, targets, self.chunk_size))
                metrics[f"ce/{layer}"] = ce
                loss = loss + ce
        metrics["loss"] = loss
        return StepOutput(loss, host_metrics(metrics))


@dataclass(frozen=True)
class LossOptions:
    """Step 2's loss (the config's ``loss`` section). Paper: forward KL at KD temperature 1 on the
    matched verbalized layers and on the last layer.

    ``direction``: ``forward`` = KL(teacher ‖ student) | ``reverse``. ``intermediate`` (the student's
    verbalized layers) and ``last_layer``: a term of :data:`INTERMEDIATE_TERMS` / :data:`LAST_LAYER_TERMS`
    (``kl``, ``ce``, ``none``; Table 4(b)/(d)'s ablations). ``chunk_size``: response tokens per chunk
    of vocab-sized logits (bounds the heads' memory).
    """

    direction: str = "forward"
    kd_temperature: float = 1.0
    last_layer: str = "kl"
    intermediate: str = "kl"
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"loss.direction={self.direction!r} is not one of {', '.join(DIRECTIONS)}; pick one of those.")
        for key, terms in (("intermediate", INTERMEDIATE_TERMS), ("last_layer", LAST_LAYER_TERMS)):
            if getattr(self, key) not in terms:
                raise ValueError(f"loss.{key}={getattr(self, key)!r} is not one of {', '.join(terms)}; pick one of those.")
        if self.intermediate == "none" and self.last_layer == "none":
            raise ValueError(
                "loss.intermediate=none with loss.last_layer=none leaves step 2 without a loss; set one of them to kl or ce."
            )
        if not self.kd_temperature > 0:
            raise ValueError(f"loss.kd_temperature={self.kd_temperature} must be positive.")
        if self.chunk_size < 1:
            raise ValueError(f"loss.chunk_size={self.chunk_size} must be at least 1.")


@dataclass
class _Step2:
    """One batch's student side of step 2, as the loss terms read it: ``hidden[i] [N, d]`` and
    ``heads[i]`` of the student's target layers, the final layer's ``final [N, d]`` and ``head``,
    ``targets [N]`` and the teacher ``signal`` (``t_l`` target layers + final)."""

    hidden: list[Tensor]
    heads: list[Callable]
    layers: list[int]
    final: Tensor
    head: Callable
    targets: Tensor
    signal: TeacherSignal


#: term name -> ``(objective, step) -> (loss, metrics)`` on the student's verbalized layers.
INTERMEDIATE_TERMS: dict[str, Callable] = {}
#: term name -> ``(objective, step) -> (loss, metrics)`` on the student's last layer.
LAST_LAYER_TERMS: dict[str, Callable] = {}


def loss_term(registry: dict, name: str):
    """Register a step-2 loss term under ``name`` in ``registry`` (:data:`INTERMEDIATE_TERMS` or :data:`LAST_LAYER_TERMS`)."""

    def register(fn):
        registry[name] = fn
        return fn

    return register


class InteractionObjective:
    """Step 2: adaptive layer matching of the student's verbalizers to the teacher's, plus the last layer.

    ``teacher`` maps a batch to its :class:`TeacherSignal` (``t_l`` target layers + final). The
    student trains through LoRA (applied by the caller) plus its verb-FFNs; heads and vision frozen.
    Candidate KLs are computed without grad over the matching band; only the chosen pairs are
    recomputed with grad, so memory does not grow with the number of candidates. ``matching`` and
    ``loss`` are the config's sections (:class:`MatchingOptions`, :class:`LossOptions`);
    ``generator`` draws the matching; ``vocab_size`` is the shared vocabulary the KL runs over.
    """

    def __init__(
        self,
        student: Backbone,
        verbalizers: Verbalizers,
        teacher: Callable[[dict], TeacherSignal],
        matching: MatchingOptions,
        loss: LossOptions | None = None,
        *,
        generator: torch.Generator,
        vocab_size: int | None = None,
    ):
        self.student = student
        self.verbalizers = verbalizers
        self.teacher = teacher
        self.options = matching
        self.loss = loss or LossOptions()
        self.generator = generator
        self.vocab = vocab_size or student.vocab_size
        if not student.lora_active:
            raise ValueError(
                "step 2 trains the student through LoRA; call student.apply_lora(...) before building the objective."
            )
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

    def kl(self, hidden: Tensor, head: Callable, signal: TeacherSignal) -> Tensor:
        """Mean KL over the ``N`` tokens between ``signal`` (one layer) and ``head(hidden [N, d])``."""
        loss = self.loss
        return token_mean(verbalized_kl(hidden, head, signal, loss.direction, loss.kd_temperature, loss.chunk_size))

    @torch.no_grad()
    def _candidate_distances(self, hidden: list[Tensor], heads: list[Callable], signal: TeacherSignal) -> Tensor:
        """Mean KL ``[t_s, t_l]`` for every pair in the matching band (inf elsewhere), without grad.

        Logits of one student layer are computed ``chunk_size`` tokens at a time and compared with
        every candidate teacher layer by :func:`candidate_kls` (the vocabulary normalised once per
        chunk, each top-k candidate then ``O(k)``), so memory holds one chunk of ``[chunk, V]`` logits
        at once and time grows little with the number of candidates.
        """
        t_s, t_l = len(hidden), signal.num_layers - 1
        band = band_mask(t_s, t_l, self.options)
        n, chunk_size = hidden[0].shape[0], self.loss.chunk_size
        rows = []  # per student layer, its candidates' summed KLs [len(candidates)], on the device
        for i in range(t_s):
            candidates = torch.nonzero(band[i]).flatten().tolist()
            row = torch.zeros(len(candidates), dtype=torch.float64, device=hidden[0].device)
            for start in range(0, n, chunk_size):
                chunk = slice(start, min(n, start + chunk_size))
                parts = [signal.layer(j).tokens(chunk) for j in candidates]
                kls = candidate_kls(parts, heads[i](hidden[i][chunk]), self.loss.direction, self.loss.kd_temperature)
                row += kls.sum(-1).to(row)
            rows.append(row)
        distances = torch.full((t_s, t_l), float("inf"))
        distances[band] = (torch.cat(rows) / max(1, n)).float().cpu()  # one transfer; band order = the rows' order
        return distances

    def __call__(self, batch: dict) -> StepOutput:
        """Intermediate term (matched KLs) + last-layer term; logs per-layer terms and the matched indices."""
        signal = self.teacher(batch)
        with self.student.autocast():
            step = self._student_side(batch, signal)
            loss = torch.zeros((), device=step.targets.device)
            metrics: dict = {}
            for term in (INTERMEDIATE_TERMS[self.loss.intermediate], LAST_LAYER_TERMS[self.loss.last_layer]):
                value, logged = term(self, step)
                loss = loss + value
                metrics.update(logged)
        metrics["loss"] = loss
        return StepOutput(loss, host_metrics(metrics))

    def _student_side(self, batch: dict, signal: TeacherSignal) -> _Step2:
        out = self.student.forward(model_inputs(batch), logits=False)
        index, targets = response_index(batch["labels"])
        if signal.num_tokens != targets.numel():
            raise ValueError(
                f"teacher signal covers {signal.num_tokens} response tokens but the student batch has "
                f"{targets.numel()}; teacher and student must see the same collated batch."
            )
        layers = self.verbalizers.layers
        heads = [
            _vocab_slice(self.verbalizers.head(layer, self.student.final_norm, self.student.lm_head), self.vocab)
            for layer in layers
        ]
        return _Step2(
            hidden=[at_index(out.hidden_states[layer], index, out.hidden_states[layer].device) for layer in layers],
            heads=heads,
            layers=layers,
            final=at_index(out.hidden_states[-1], index, out.hidden_states[-1].device),
            head=_vocab_slice(self.student.lm_head, self.vocab),
            targets=targets,
            signal=signal,
        )


def _zero(step: _Step2) -> Tensor:
    return torch.zeros((), device=step.targets.device)


@loss_term(INTERMEDIATE_TERMS, "kl")
def _matched_kl(objective: InteractionObjective, step: _Step2) -> tuple[Tensor, dict]:
    """The paper: each student layer's KL to its matched teacher layer(s) (adaptive layer matching)."""
    t_s, t_l = len(step.layers), step.signal.num_layers - 1
    options = objective.options
    distances = (
        objective._candidate_distances(step.hidden, step.heads, step.signal) if options.uses_distances else torch.zeros(t_s, t_l)
    )
    match = match_layers(distances, options, objective.generator)
    loss, metrics = _zero(step), {}
    for i, (indices, weights) in enumerate(zip(match.indices, match.weights)):
        term = sum(w * objective.kl(step.hidden[i], step.heads[i], step.signal.layer(j)) for j, w in zip(indices, weights))
        metrics[f"kl/{step.layers[i]}"] = term
        loss = loss + term
    # Matched teacher target layers (0-based positions in the teacher's target list) per student target layer: Fig. 5's data.
    metrics["matched"] = [[int(j) for j in indices] for indices in match.indices]
    return loss, metrics


@loss_term(INTERMEDIATE_TERMS, "ce")
def _intermediate_ce(objective: InteractionObjective, step: _Step2) -> tuple[Tensor, dict]:
    """Table 4(d)'s ablation: each verbalized layer's cross-entropy on the ground truth, no teacher."""
    loss, metrics = _zero(step), {}
    for hidden, head, layer in zip(step.hidden, step.heads, step.layers):
        term = token_mean(verbalized_ce(hidden, head, step.targets, objective.loss.chunk_size))
        metrics[f"ce/{layer}"] = term
        loss = loss + term
    return loss, metrics


@loss_term(LAST_LAYER_TERMS, "kl")
def _last_kl(objective: InteractionObjective, step: _Step2) -> tuple[Tensor, dict]:
    """The paper: the student's final distribution to the teacher's."""
    last = objective.kl(step.final, step.head, step.signal.layer(step.signal.num_layers - 1))
    return last, {"kl/last": last}


@loss_term(LAST_LAYER_TERMS, "ce")
def _last_ce(objective: InteractionObjective, step: _Step2) -> tuple[Tensor, dict]:
    """Table 4(d)'s ablation: the last layer's cross-entropy on the ground truth."""
    last = token_mean(verbalized_ce(step.final, objective.student.lm_head, step.targets, objective.loss.chunk_size))
    return last, {"ce/last": last}


@loss_term(INTERMEDIATE_TERMS, "none")
@loss_term(LAST_LAYER_TERMS, "none")
def _no_term(objective: InteractionObjective, step: _Step2) -> tuple[Tensor, dict]:
    """No term (final-layer-only KD when intermediate; Table 4(d) without the last-layer term)."""
    return _zero(step), {}
