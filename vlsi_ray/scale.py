"""Cost model of a run from its config: FLOPs, bytes per GPU, samples/s, the bottleneck and the days.

It counts what the code runs, per sample of a :class:`Workload` (``T`` tokens of which ``I`` are
image tokens and ``R`` are response positions), in :mod:`torch.utils.flop_counter`'s convention:
``2·m·n·k`` per matmul, attention as the full ``T × T`` square, elementwise work free.

==================  ===========================================================================
stage               what runs (``d`` width, ``V`` vocabulary, ``t`` target layers, ``L`` blocks)
==================  ===========================================================================
teacher signal      ViT + ``L`` blocks forward over ``T``; at the ``R`` response positions one
                    verbalizer (verb-FFN ``6d²`` + LM head ``2dV``) per target layer and the LM head
verbalize           the same forward without grad; each verbalizer forward, recomputed
                    (checkpointed chunks) and backward (verb-FFN weights + its input, LM head input)
interact (student)  blocks forward + backward through frozen weights and LoRA (recomputed once more
                    with gradient checkpointing); each student head once without grad for the
                    candidate KLs, the matched pairs and the last layer with grad; the ViT forward
sft                 the LLM and projector fully: blocks forward + backward with weight gradients,
                    the LM head at ``R`` positions
==================  ===========================================================================

Throughput: a GPU sustains ``mfu ×`` its dense bf16 peak. A teacher replica spread layer-wise over
``g`` GPUs (``device_map="auto"``, today's layout) has one GPU busy at a time; a tensor-parallel
replica has all ``g`` busy and pays two all-reduces of ``[T, d]`` per block over NVLink. Step 2
runs at the slower side's rate: that side is the bottleneck. Bytes per GPU: weights in their dtype,
trained weights with their gradients and AdamW state (plain float32, or DeepSpeed ZeRO shards:
:func:`trained_bytes`), and activations (:func:`activation_bytes`); a training step peaks at the start
or the end of its backward (:func:`training_peak_bytes`). :mod:`vlsi_ray.profiling` measures both
on tiny models (``bench/scale.py --check``); ``bench/scale.py`` prints the model for a config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 2**30


# ----- model shapes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextShape:
    """The language model of a checkpoint (a Qwen2 decoder: GQA attention, gated MLP, RMSNorm)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections, ``kv_heads × head_dim``."""
        return self.kv_heads * (self.hidden // self.heads)

    def block_matmul_params(self) -> int:
        """Weights of one block's seven projections (q, k, v, o, gate, up, down)."""
        d = self.hidden
        return 2 * d * d + 2 * d * self.kv_dim + 3 * d * self.intermediate

    def params(self) -> int:
        """All parameters: blocks (with q/k/v biases and two norms), embeddings, LM head, final norm."""
        d = self.hidden
        block = self.block_matmul_params() + (d + 2 * self.kv_dim) + 2 * d
        head = 0 if self.tied else self.vocab * d
        return self.layers * block + self.vocab * d + head + d


@dataclass(frozen=True)
class VisionShape:
    """The vision tower and projector: Qwen2-VL's or Qwen2.5-VL's ViT + patch merger, or SigLIP + LLaVA's
    2-layer MLP.

    ``merge`` ViT patches become one LLM token (Qwen: 2×2 = 4; SigLIP: 1); ``patch_inputs`` is the size
    of one flattened patch (channels × temporal patch × patch²). Qwen2.5-VL's blocks have a gated MLP
    and RMSNorms; the others a 2-layer MLP and LayerNorms.
    """

    kind: str  # qwen2_vl | qwen2_5_vl | siglip
    embed: int
    depth: int
    intermediate: int
    patch_inputs: int
    merge: int
    out_hidden: int
    positions: int = 0  # SigLIP's learned position embeddings (patches per crop)

    @property
    def gated(self) -> bool:
        """Whether the blocks' MLP is gated (three matmuls instead of two)."""
        return self.kind == "qwen2_5_vl"

    def block_matmul_params(self) -> int:
        """Weights of one block's matmuls (qkv, proj, the MLP)."""
        return 4 * self.embed**2 + (3 if self.gated else 2) * self.embed * self.intermediate

    def params(self) -> int:
        """Patch embedding, blocks (matmuls with biases, two norms each) and projector."""
        e, f = self.embed, self.intermediate
        norm = e if self.gated else 2 * e  # RMSNorm or LayerNorm
        biases = 4 * e + ((2 * f + e) if self.gated else (f + e))
        block = self.block_matmul_params() + biases + 2 * norm
        if self.kind != "siglip":
            wide = e * self.merge
            projector = norm + wide * wide + wide + wide * self.out_hidden + self.out_hidden
            return self.patch_inputs * e + self.depth * block + projector
        # SigLIP: patch embedding bias, position embeddings, post-LayerNorm; LLaVA's projector and image_newline
        extra = e + self.positions * e + 2 * e
        projector = e * self.out_hidden + self.out_hidden + self.out_hidden**2 + self.out_hidden + self.out_hidden
        return self.patch_inputs * e + self.depth * block + extra + projector


@dataclass(frozen=True)
class ModelShape:
    """One checkpoint's shapes, as its ``config.json`` gives them."""

    name: str
    text: TextShape
    vision: VisionShape | None

    def params(self) -> int:
        """Parameters of the whole model."""
        return self.text.params() + (self.vision.params() if self.vision else 0)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "model") -> ModelShape:
        """Shapes from a transformers config dict: the Hub's flat layout or transformers 5's ``text_config``."""
        text = dict(config)
        text.update(config.get("text_config") or {})
        vision = config.get("vision_config") or None
        try:
            heads = text["num_attention_heads"]
            text_shape = TextShape(
                hidden=text["hidden_size"],
                layers=text["num_hidden_layers"],
                intermediate=text["intermediate_size"],
                heads=heads,
                kv_heads=text.get("num_key_value_heads") or heads,
                vocab=text["vocab_size"],
                tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            )
        except KeyError as missing:
            raise ValueError(
                f"{name}: config has no {missing.args[0]!r}; point the path at a Qwen2-VL or LLaVA-OneVision checkpoint."
            ) from None
        return cls(name, text_shape, _vision_shape(vision, text_shape.hidden) if vision else None)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelShape:
        """Shapes from ``<path>/config.json``, or from :data:`KNOWN_CHECKPOINTS` by the directory's name."""
        path = Path(path)
        if (path / "config.json").is_file():
            return cls.from_hf_config(json.loads((path / "config.json").read_text()), path.name)
        if path.name in KNOWN_CHECKPOINTS:
            return cls.from_hf_config(KNOWN_CHECKPOINTS[path.name], path.name)
        raise FileNotFoundError(
            f"{path} has no config.json and is not one of the known checkpoints ({', '.join(KNOWN_CHECKPOINTS)}); "
            "point the model's path at a downloaded checkpoint."
        )


def _vision_shape(vision: dict, text_hidden: int) -> VisionShape:
    patch = vision.get("patch_size", 14)
    if "embed_dim" in vision or "out_hidden_size" in vision:  # Qwen2-VL's or Qwen2.5-VL's ViT
        qwen2 = "embed_dim" in vision
        embed = vision["embed_dim"] if qwen2 else vision["hidden_size"]
        return VisionShape(
            kind="qwen2_vl" if qwen2 else "qwen2_5_vl",
            embed=embed,
            depth=vision["depth"],
            intermediate=int(embed * vision.get("mlp_ratio", 4)) if qwen2 else vision["intermediate_size"],
            patch_inputs=vision.get("in_channels", vision.get("in_chans", 3)) * vision.get("temporal_patch_size", 2) * patch**2,
            merge=vision.get("spatial_merge_size", 2) ** 2,
            out_hidden=vision.get("hidden_size", text_hidden) if qwen2 else vision["out_hidden_size"],
        )
    return VisionShape(  # SigLIP (LLaVA-OneVision)
        kind="siglip",
        embed=vision["hidden_size"],
        depth=vision["num_hidden_layers"],
        intermediate=vision["intermediate_size"],
        patch_inputs=vision.get("num_channels", 3) * patch * patch,
        merge=1,
        out_hidden=text_hidden,
        positions=(vision.get("image_size", 384) // patch) ** 2,
    )


_QWEN2_VL_VIT = {
    "depth": 32,
    "embed_dim": 1280,
    "mlp_ratio": 4,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
_SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26, "patch_size": 14, "image_size": 384}

#: The released checkpoints' ``config.json`` shape keys (Hugging Face Hub), for costing a config whose
#: checkpoints are not on this machine; a directory with its own config.json always wins.
KNOWN_CHECKPOINTS: dict[str, dict] = {
    "Qwen2-VL-72B-Instruct": {
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "vision_config": {**_QWEN2_VL_VIT, "hidden_size": 8192},
    },
    "Qwen2-VL-7B-Instruct": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "vision_config": {**_QWEN2_VL_VIT, "hidden_size": 3584},
    },
    "Qwen2-VL-2B-Instruct": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "vision_config": {**_QWEN2_VL_VIT, "hidden_size": 1536},
    },
    "llava-onevision-qwen2-72b-ov-hf": {
        "text_config": {
            "hidden_size": 8192,
            "intermediate_size": 29568,
            "num_attention_heads": 64,
            "num_hidden_layers": 80,
            "num_key_value_heads": 8,
            "vocab_size": 152128,
        },
        "tie_word_embeddings": False,
        "vision_config": _SIGLIP_SO400M,
    },
    "llava-onevision-qwen2-7b-ov-hf": {
        "text_config": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_attention_heads": 28,
            "num_hidden_layers": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152128,
        },
        "tie_word_embeddings": False,
        "vision_config": _SIGLIP_SO400M,
    },
}


# ----- the work of one sample ---------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One training sample: ``tokens`` LLM tokens (``image_tokens`` of them from ``images`` images),
    ``response`` positions that carry a loss. The paper's data: about 2,048 tokens, 30% response."""

    tokens: int = 2048
    response: int = 614
    image_tokens: int = 1024
    images: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.response < self.tokens or not 0 <= self.image_tokens < self.tokens:
            raise ValueError(f"workload: need 0 < response ({self.response}) < tokens ({self.tokens}) and image_tokens < tokens.")


@dataclass(frozen=True)
class StepSettings:
    """What a stage's code does beyond the shapes: target layers, LoRA, checkpointing, matched pairs."""

    targets: int = 0  # verbalized target layers of the model the stage runs
    lora_rank: int = 0  # 0: no LoRA
    checkpointing: bool = False  # blocks recomputed in backward
    pairs: int = 1  # teacher layers matched per student target layer (multinomial: 1)


def _attention(tokens: int, width: int) -> float:
    """Attention matmuls per token (``QKᵀ`` and ``AV`` over the full square), forward."""
    return 4.0 * tokens * width


def vision_flops(vision: VisionShape | None, work: Workload) -> float:
    """Forward FLOPs of the vision tower and projector for one sample's images."""
    return _vit_flops(vision, work) + projector_flops(vision, work)


def _vit_flops(vision: VisionShape | None, work: Workload) -> float:
    if vision is None or work.image_tokens == 0:
        return 0.0
    patches = work.image_tokens * vision.merge
    e = vision.embed
    # attention over each whole image (Qwen2.5-VL's windowed blocks attend to less: an upper bound there)
    per_block = 2.0 * vision.block_matmul_params() + _attention(patches / work.images, e)
    return patches * (2.0 * vision.patch_inputs * e + vision.depth * per_block)


def projector_flops(vision: VisionShape | None, work: Workload) -> float:
    """Forward FLOPs of the projector (Qwen2-VL's patch merger, LLaVA's 2-layer MLP) for one sample."""
    if vision is None:
        return 0.0
    if vision.kind != "siglip":
        wide = vision.embed * vision.merge
        return work.image_tokens * (2.0 * wide * wide + 2.0 * wide * vision.out_hidden)
    return work.image_tokens * (2.0 * vision.embed * vision.out_hidden + 2.0 * vision.out_hidden**2)


def _projector_backward(vision: VisionShape | None, work: Workload) -> float:
    """Backward FLOPs of a trained projector: weight and input gradients of its two matmuls, except
    the input gradient of LLaVA's first (its input, SigLIP's output, is frozen; Qwen's merger starts
    with a trained norm, so its first matmul's input needs a gradient)."""
    if vision is None:
        return 0.0
    backward = 2 * projector_flops(vision, work)
    if vision.kind == "siglip":
        backward -= work.image_tokens * 2.0 * vision.embed * vision.out_hidden
    return backward


def _lora_flops(text: TextShape, rank: int) -> float:
    """LoRA's forward FLOPs per token per block (``A`` then ``B`` on each of the seven projections)."""
    d, kv, f = text.hidden, text.kv_dim, text.intermediate
    ins_outs = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
    return 2.0 * rank * sum(i + o for i, o in ins_outs)


def blocks_forward(text: TextShape, work: Workload, rank: int = 0) -> float:
    """Forward FLOPs of the ``L`` blocks over ``T`` tokens (plus LoRA of ``rank``)."""
    per_token = 2.0 * text.block_matmul_params() + _attention(work.tokens, text.hidden) + _lora_flops(text, rank)
    return text.layers * work.tokens * per_token


def verb_ffn_flops(text: TextShape) -> float:
    """A verb-FFN's forward FLOPs per token: three ``d×d`` matmuls."""
    return 6.0 * text.hidden**2


def lm_head_flops(text: TextShape) -> float:
    """The LM head's forward FLOPs per token."""
    return 2.0 * text.hidden * text.vocab


def teacher_signal_flops(shape: ModelShape, work: Workload, settings: StepSettings) -> dict[str, float]:
    """FLOPs of :func:`~vlsi_ray.signals.produce.teacher_signal` for one sample, by part."""
    text = shape.text
    return {
        "vision": vision_flops(shape.vision, work),
        "blocks": blocks_forward(text, work),
        # every target layer's verbalizer and the final LM head at R positions; the model's own LM head
        # runs at the last position only (logits_to_keep=1)
        "heads": work.response * (settings.targets * (verb_ffn_flops(text) + lm_head_flops(text)) + lm_head_flops(text))
        + lm_head_flops(text),
    }


def verbalize_flops(shape: ModelShape, work: Workload, settings: StepSettings) -> dict[str, float]:
    """FLOPs of one sample of step 1 (:class:`~vlsi_ray.method.steps.VerbalizationObjective`), by part.

    Each head runs forward, again when its checkpointed chunk is recomputed, and backward: the
    verb-FFN's three weight gradients and its down projection's input gradient (``8d²``; its input
    is a frozen hidden state), the LM head's input gradient (``2dV``, its weight is frozen).
    """
    text = shape.text
    head_fwd = verb_ffn_flops(text) + lm_head_flops(text)
    head_bwd = 8.0 * text.hidden**2 + lm_head_flops(text)
    return {
        "vision": vision_flops(shape.vision, work),
        "blocks": blocks_forward(text, work),
        "heads": work.response * settings.targets * (2 * head_fwd + head_bwd) + lm_head_flops(text),
    }


def _blocks_backward_frozen(text: TextShape, work: Workload, rank: int) -> float:
    """Backward FLOPs of the blocks with frozen weights and LoRA: input gradients everywhere except
    the first block's q/k/v (its input is a frozen embedding), attention twice its forward, LoRA's
    weight and input gradients (twice its forward)."""
    d, t = text.hidden, work.tokens
    first_qkv = 2.0 * (d * d + 2 * d * text.kv_dim) + 3 * 2.0 * rank * d  # base and LoRA A input gradients
    inputs = text.layers * 2.0 * text.block_matmul_params() - first_qkv
    return t * (inputs + text.layers * (2 * _attention(t, d) + 2 * _lora_flops(text, rank)))


def _last_matmul(text: TextShape, rank: int) -> float:
    """FLOPs per token of a block's last matmul, which a checkpoint's recompute skips (torch's early
    stop: no saved tensor needs its output): LoRA's ``B`` of the down projection, else the projection."""
    return 2.0 * rank * text.hidden if rank else 2.0 * text.intermediate * text.hidden


def interact_flops(shape: ModelShape, work: Workload, settings: StepSettings) -> dict[str, float]:
    """FLOPs of one sample of step 2's student side (:class:`~vlsi_ray.method.steps.InteractionObjective`).

    The heads: each student target layer's head once without grad (the candidate KLs), then
    ``pairs`` matched KLs per layer and the last layer with grad (forward, checkpoint recompute,
    backward: verb-FFN weights and input ``12d²``, LM head input ``2dV``). Checkpointing adds a
    recompute of the blocks that stops before each block's last matmul.
    """
    text, rank = shape.text, settings.lora_rank
    forward = blocks_forward(text, work, rank)
    recompute = forward - text.layers * work.tokens * _last_matmul(text, rank) if settings.checkpointing else 0.0
    head_fwd = verb_ffn_flops(text) + lm_head_flops(text)
    trained_head = 2 * head_fwd + 12.0 * text.hidden**2 + lm_head_flops(text)
    last = 3 * lm_head_flops(text)
    return {
        "vision": vision_flops(shape.vision, work),
        "blocks": forward + recompute + _blocks_backward_frozen(text, work, rank),
        "heads": work.response * (settings.targets * (head_fwd + settings.pairs * trained_head) + last) + lm_head_flops(text),
    }


def sft_flops(shape: ModelShape, work: Workload, settings: StepSettings) -> dict[str, float]:
    """FLOPs of one sample of step 3 (:class:`~vlsi_ray.method.steps.SFTObjective`, the LLM fully trained).

    Blocks: forward and backward with input and weight gradients (twice the forward's matmuls,
    attention twice); with checkpointing a recompute that stops before each block's last matmul
    (torch's early stop: the down projection's output is saved by nothing). The projector trains
    (:data:`~vlsi_ray.method.steps.SFT_GROUPS`). LM head: forward, recompute and backward (input
    and weight gradients) at ``R`` positions.
    """
    text, t = shape.text, work.tokens
    forward = blocks_forward(text, work)
    recompute = forward - text.layers * t * _last_matmul(text, 0) if settings.checkpointing else 0.0
    return {
        "vision": vision_flops(shape.vision, work) + _projector_backward(shape.vision, work),
        "blocks": forward + recompute + 2 * forward,
        "heads": work.response * 4 * lm_head_flops(text) + lm_head_flops(text),
    }


# ----- bytes -------------------------------------------------------------------------------------


def trained_bytes(params: float, shards: int = 1, zero_stage: int = 0, compute_bytes: int = 2) -> dict[str, float]:
    """Bytes per GPU of ``params`` trained weights.

    ``zero_stage`` 0 (this project's plain data parallelism and the in-process runner): the weights are
    float32 masters with float32 gradients and AdamW's two float32 moments. DeepSpeed (1-3, mixed
    precision): weights and gradients in the compute dtype, float32 masters and moments in the
    optimizer; stage 1 splits masters and moments ``shards`` ways, 2 also the gradients, 3 also the
    weights.
    """
    if zero_stage == 0:
        return {"weights": 4.0 * params, "gradients": 4.0 * params, "optimizer": 8.0 * params}
    split = lambda part, stage: part / shards if zero_stage >= stage else part  # noqa: E731
    return {
        "weights": split(compute_bytes * params, 3),
        "gradients": split(compute_bytes * params, 2),
        "optimizer": split(12.0 * params, 1),
    }


def verbalizer_params(text: TextShape, targets: int) -> int:
    """Parameters of ``targets`` verb-FFNs (three ``d×d`` each)."""
    return 3 * text.hidden**2 * targets


def lora_params(text: TextShape, rank: int) -> int:
    """Parameters of LoRA of ``rank`` on every block's seven projections."""
    return int(_lora_flops(text, rank) / 2) * text.layers


def block_saved_elements(text: TextShape, rank: int = 0, norms_trained: bool = False) -> int:
    """Elements one block saves per token for its backward, in the compute dtype.

    What autograd keeps (sdpa/flash attention, which saves no ``T × T`` matrix): both RMSNorms'
    inputs and ``rsqrt`` (``2d + 2``; their normalised inputs too, ``+2d``, when the norm weights
    train), the inputs of the q/k/v, o and gate/up projections (``3d``), the query, key and value
    (``d + 2·kv``), the attention's log-sum-exp (one per head), the MLP's gate, SiLU, up and down
    inputs (``4F``), and each LoRA ``A``'s output (``7r``).
    """
    d, f = text.hidden, text.intermediate
    norms = 2 * d + 2 + (2 * d if norms_trained else 0)
    return norms + 3 * d + d + 2 * text.kv_dim + text.heads + 4 * f + 7 * rank


#: ``[chunk, V]`` float32 tensors a head's backward holds at once (recomputed in its checkpointed chunk):
#: the KL's logits, log-softmax, probabilities and three gradients; cross-entropy's logits, log-softmax and
#: gradient (counted with vlsi_ray.profiling.PeakTensorBytes: 6.00 and 3.00 dense chunks).
HEAD_CHUNK_TENSORS = {"kl": 6, "ce": 3}


@dataclass(frozen=True)
class Activations:
    """A training micro-batch's activation bytes: at the start of backward (``peak``) and while one
    block runs its backward (``block``: what it saved or recomputed, and its gradients)."""

    peak: float
    block: float


def activation_bytes(
    shape: ModelShape,
    work: Workload,
    *,
    checkpointing: bool,
    rank: int = 0,
    full: bool = False,
    heads: int = 1,
    loss: str = "kl",
    compute_bytes: int = 2,
    chunk: int = 1024,
) -> Activations:
    """Activation bytes of one sample while the student trains (steps 2, 3).

    Without checkpointing every block keeps :func:`block_saved_elements` per token; with it each
    block keeps its input ``[T, d]`` and one block's worth is live again while it recomputes. A
    block's backward adds its MLP gradients (``2F`` per token; ``3F + 3d`` at the first block
    without checkpointing). ``full``: the LLM trains fully (norm weights too: step 3); ``heads``:
    heads trained with grad (each keeps its ``[R, d]`` input and, with checkpointing, until backward
    reaches its layer, the ``[T, d]`` gradient of its hidden state); a head's backward holds one
    chunk's ``[chunk, V]`` float32 tensors, :data:`HEAD_CHUNK_TENSORS` of them for its ``loss``. A
    16-bit compute dtype keeps float32 copies of RMSNorm's inputs.
    """
    text, t, d = shape.text, work.tokens, shape.text.hidden
    per_block = t * block_saved_elements(text, rank, full) * compute_bytes
    if compute_bytes < 4:
        per_block += t * 2 * d * (4 - compute_bytes)
    block = per_block + t * 2 * text.intermediate * compute_bytes
    inputs = heads * work.response * d * compute_bytes
    # the head's own logits too when they are 16-bit (the loss upcasts a copy)
    logits = (HEAD_CHUNK_TENSORS[loss] * 4 + (compute_bytes if compute_bytes < 4 else 0)) * min(chunk, work.response) * text.vocab
    if checkpointing:  # the heads' logits are gone when the first block recomputes
        waiting = (heads - 1) * t * d * compute_bytes
        peak = (text.layers + 1) * t * d * compute_bytes + waiting + inputs + max(block, logits)
    else:
        peak = text.layers * per_block + t * (3 * text.intermediate + 3 * d) * compute_bytes + inputs + logits
    return Activations(peak=peak, block=block)


def training_peak_bytes(
    trained_params: float, activations: Activations, shards: int = 1, zero_stage: int = 0, compute_bytes: int = 2
) -> dict[str, float]:
    """Peak bytes of one training step beyond the frozen weights, by part: the trained weights,
    optimizer state, gradients (:func:`trained_bytes`) and activations.

    Gradients appear as backward frees activations, so the peak is the start of backward (all
    activations, no gradients yet) or its end (all gradients, one block's activations). (Autocast's
    16-bit copies of float32 masters are gone by then: its cache ends with the forward.)
    """
    state = trained_bytes(trained_params, shards, zero_stage, compute_bytes)
    parts = {"trained weights": state["weights"], "optimizer": state["optimizer"]}
    if activations.peak >= state["gradients"] + activations.block:
        return {**parts, "activations": activations.peak}
    return {**parts, "gradients": state["gradients"], "activations": activations.block}


# ----- GPUs, layouts and the run --------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """One accelerator: dense bf16 peak FLOP/s, memory, NVLink bandwidth per direction."""

    name: str
    peak_flops: float
    memory: int
    link: float


GPUS = {
    "A100": Gpu("A100-SXM4-80GB", 312e12, 80 * GiB, 300e9),
    "H100": Gpu("H100-SXM5-80GB", 989e12, 80 * GiB, 450e9),
}


@dataclass(frozen=True)
class Layout:
    """How a run spreads over its GPUs.

    A teacher replica holds ``teacher_gpus`` GPUs, ``pipeline`` (its layers spread over them, one GPU
    busy at a time: ``device_map="auto"``) or ``tensor`` parallel (every GPU busy on a slice of every
    layer). Step 1 trains the teacher's verb-FFNs on ``step1_replicas`` replicas (data-parallel), each
    holding its float32 AdamW state whole (``step1_optimizer="replicated"``) or sharded ZeRO-2 over the
    replicas with masters, gradient accumulators and moments on the host (``"zero2-offload"``,
    :class:`~vlsi_ray.method.offload.OffloadStepper`); ``shard_verbalizers``: a tensor-parallel replica splits
    each verb-FFN over its ranks (``teacher_pool.shard_verbalizers``). The student's
    ``student_workers`` Train workers hold one GPU each, ZeRO ``student_zero_stage`` (0: plain DDP);
    step 3 needs no teacher and may run ``sft_workers`` of them.
    """

    name: str
    teacher_replicas: int
    teacher_gpus: int
    teacher_parallel: str
    student_workers: int
    step1_replicas: int
    student_zero_stage: int
    step1_optimizer: str = "replicated"  # replicated | zero2-offload
    sft_workers: int = 0  # step 3's Train workers (0: student_workers); the teacher is gone by then
    shard_verbalizers: bool = False  # verb-FFNs split over a tensor-parallel replica's ranks (else whole on each)

    @property
    def gpus(self) -> int:
        """GPUs the layout holds."""
        return self.teacher_replicas * self.teacher_gpus + self.student_workers

    @property
    def split(self) -> str:
        """``teacher : student`` GPUs."""
        return f"{self.teacher_replicas * self.teacher_gpus}:{self.student_workers}"

    @property
    def tensor_parallel(self) -> int:
        """GPUs that split each teacher layer (1 for a pipelined replica)."""
        return self.teacher_gpus if self.teacher_parallel == "tensor" else 1


def layout_of(cfg) -> Layout:
    """The layout a :class:`~vlsi_ray.config.RunConfig` runs: a replica of several GPUs is tensor-parallel
    with ``teacher_pool.tensor_parallel`` > 1, else pipelined (``device_map="auto"``)."""
    tp = cfg.teacher_pool.tensor_parallel
    gpus = max(tp, int(round(cfg.teacher_pool.resources.num_gpus)), 1)
    return Layout(
        name="the config's",
        teacher_replicas=cfg.teacher_pool.replicas,
        teacher_gpus=gpus,
        teacher_parallel="tensor" if tp > 1 or gpus == 1 else "pipeline",
        student_workers=cfg.train.num_workers,
        step1_replicas=cfg.teacher_pool.replicas if cfg.teacher_pool.step1_data_parallel else 1,
        student_zero_stage=cfg.train.deepspeed_stage,
        step1_optimizer=cfg.teacher_pool.step1_optimizer,
        sft_workers=cfg.train.sft_workers,
        shard_verbalizers=cfg.teacher_pool.shard_verbalizers and tp > 1,
    )


#: How ``conf/qwen2vl_72b_to_7b.yaml`` ran before its 6:2 split: one teacher replica spread layer-wise over a
#: 4-GPU pod (``device_map="auto"``), step 1's teacher on it with float32 AdamW, 4 student workers with ZeRO-2.
PIPELINED_4_4 = Layout(
    name="4:4 pipelined (before)",
    teacher_replicas=1,
    teacher_gpus=4,
    teacher_parallel="pipeline",
    student_workers=4,
    step1_replicas=1,
    student_zero_stage=2,
)


def balanced_layout(today: Layout, teacher_gpus: int, student_gpus: int, tensor_parallel: int) -> Layout:
    """The FLOP-balanced plan: ``teacher_gpus : student_gpus``, tensor-parallel teacher replicas of
    ``tensor_parallel`` GPUs with their verb-FFNs split over the ranks; step 1's teacher data-parallel
    over every replica with its optimizer state on the host; step 3 on every GPU. ``today``: the
    layout it replaces (its ZeRO stage is kept)."""
    if teacher_gpus % tensor_parallel:
        raise ValueError(f"{teacher_gpus} teacher GPUs do not divide into tensor-parallel replicas of {tensor_parallel}.")
    replicas = teacher_gpus // tensor_parallel
    return Layout(
        name=f"{teacher_gpus}:{student_gpus}, TP={tensor_parallel}",
        teacher_replicas=replicas,
        teacher_gpus=tensor_parallel,
        teacher_parallel="tensor",
        student_workers=student_gpus,
        step1_replicas=replicas,
        student_zero_stage=today.student_zero_stage,
        step1_optimizer="zero2-offload",
        sft_workers=teacher_gpus + student_gpus,
        shard_verbalizers=True,
    )


@dataclass(frozen=True)
class Side:
    """One side of a stage: its GPUs, FLOPs per sample, samples/s and bytes per GPU by part."""

    name: str
    gpus: int
    flops: float
    samples_per_s: float
    bytes_per_gpu: dict[str, float]
    host_bytes: float = 0.0  # per GPU, offloaded to the host

    @property
    def peak_bytes(self) -> float:
        """Bytes per GPU in all."""
        return sum(self.bytes_per_gpu.values())

    def fits(self, gpu: Gpu) -> bool:
        """Whether the side fits ``gpu``'s memory."""
        return self.peak_bytes <= gpu.memory


@dataclass(frozen=True)
class StageCost:
    """One of the three steps: its sides (running at once) and the signal it moves."""

    name: str
    sides: tuple[Side, ...]
    signal_bytes: float = 0.0  # per sample, teacher -> student

    @property
    def rate(self) -> float:
        """Samples/s of the stage: its slowest side's."""
        return min(side.samples_per_s for side in self.sides)

    @property
    def bottleneck(self) -> str:
        """The side that sets the rate."""
        return min(self.sides, key=lambda side: side.samples_per_s).name


def _teacher_seconds(flops: float, work: Workload, text: TextShape, layout: Layout, gpu: Gpu, mfu: float) -> float:
    """Seconds one teacher replica takes for ``flops`` of one sample."""
    g = layout.teacher_gpus
    if layout.teacher_parallel == "pipeline" or g == 1:
        return flops / (gpu.peak_flops * mfu)  # one GPU of the replica busy at a time
    # two ring all-reduces of [T, d] bf16 per block (after attention and after the MLP), not overlapped
    comm = text.layers * 2 * (2 * (g - 1) / g) * work.tokens * text.hidden * 2 / gpu.link
    return flops / (g * gpu.peak_flops * mfu) + comm


def _inference_bytes(text: TextShape, work: Workload, tp: int) -> float:
    """Activations of a teacher forward without grad: a few ``[T, d]`` and ``[T, F/tp]`` buffers and
    four float32 ``[R, V]`` tensors of one head (its logits, and in :meth:`TeacherSignal.from_logits`
    their ``/ T`` copy, log-softmax and scatter copy: 4.1-4.3 measured, docs/BENCHMARKS.md)."""
    return work.tokens * (4 * text.hidden + 3 * text.intermediate / tp) * 2 + 4 * work.response * text.vocab * 4


def stage_costs(
    teacher: ModelShape,
    student: ModelShape,
    cfg,
    layout: Layout,
    gpu: Gpu,
    work: Workload,
    mfu: float = 0.4,
    student_mfu: float | None = None,
) -> list[StageCost]:
    """The cost of each of the three steps of ``cfg`` on ``layout`` over ``gpu``s, the teacher's side
    at ``mfu`` and the student's at ``student_mfu`` (default: the same; ``bench/gpu_calibrate.py``
    measures both)."""
    s_mfu = mfu if student_mfu is None else student_mfu
    from vlsi_ray.signals.teacher_signal import wire_bytes_per_token_per_layer  # noqa: PLC0415 - loads torch

    t_targets = len(cfg.teacher.targets.resolve(teacher.text.layers))
    s_targets = len(cfg.student.targets.resolve(student.text.layers))
    rank, ckpt, topk = cfg.lora.rank, cfg.student.gradient_checkpointing, cfg.signal.topk
    zero, workers, tp = layout.student_zero_stage, layout.student_workers, layout.tensor_parallel
    verb_split = tp if layout.shard_verbalizers else 1  # ranks a verb-FFN is split over (else each holds it whole)
    teacher_weights = teacher.params() * 2 / layout.teacher_gpus
    student_weights = student.params() * 2

    def student_training(trained: float, acts: Activations, batch: int, flops: float, gpus: int = workers) -> Side:
        scaled = Activations(acts.peak * batch, acts.block * batch)
        parts = training_peak_bytes(trained, scaled, gpus, zero)
        frozen = student_weights - trained * 2
        return Side("student", gpus, flops, gpus * gpu.peak_flops * s_mfu / flops, {"frozen weights": frozen, **parts})

    # step 1: the teacher's verb-FFNs on step1_replicas replicas, the student's on its workers, at once
    verb_t = verbalizer_params(teacher.text, t_targets)
    f1t = sum(verbalize_flops(teacher, work, StepSettings(targets=t_targets)).values())
    if layout.step1_optimizer == "replicated":  # plain AdamW, every head whole (pipelined: on one GPU)
        state, host = trained_bytes(verb_t), 0.0
    else:  # OffloadStepper: each rank's part of the heads in the compute dtype with its whole gradient until the
        # backward's end (then reduce-scattered, parameter by parameter); float32 master, gradient accumulator and
        # moments of a 1/replicas slice on the host
        local_params = verb_t / verb_split
        state = {"weights": 2.0 * local_params, "gradients": 2.0 * local_params}
        host = 16.0 * local_params / layout.step1_replicas
    logits_t = HEAD_CHUNK_TENSORS["ce"] * min(cfg.loss.chunk_size, work.response) * teacher.text.vocab * 4
    heads_t = cfg.stages.verbalize.batch_size * work.response * teacher.text.hidden * 2 * t_targets + logits_t
    step1_teacher = Side(
        "teacher",
        layout.step1_replicas * layout.teacher_gpus,
        f1t,
        layout.step1_replicas / _teacher_seconds(f1t, work, teacher.text, layout, gpu, mfu),
        {"frozen weights": teacher_weights, **{f"verb-FFN {k}": v for k, v in state.items()}, "activations": heads_t},
        host_bytes=host,  # float32 masters, gradient accumulators and moments, updated on the host (ZeRO-Offload)
    )
    f1s = sum(verbalize_flops(student, work, StepSettings(targets=s_targets)).values())
    heads_s = Activations(
        work.response * student.text.hidden * 2 * s_targets
        + HEAD_CHUNK_TENSORS["ce"] * min(cfg.loss.chunk_size, work.response) * student.text.vocab * 4,
        0.0,
    )
    step1 = StageCost(
        "verbalize",
        (
            step1_teacher,
            student_training(verbalizer_params(student.text, s_targets), heads_s, cfg.stages.verbalize.batch_size, f1s),
        ),
    )

    # step 2: the teacher pool's signal, the student's LoRA + verb-FFNs
    f2t = sum(teacher_signal_flops(teacher, work, StepSettings(targets=t_targets)).values())
    teacher_side = Side(
        "teacher",
        layout.teacher_replicas * layout.teacher_gpus,
        f2t,
        layout.teacher_replicas / _teacher_seconds(f2t, work, teacher.text, layout, gpu, mfu),
        {
            "frozen weights": teacher_weights,
            "verb-FFNs": verb_t * 2 / verb_split,
            "activations": _inference_bytes(teacher.text, work, tp),
        },
    )
    f2s = sum(interact_flops(student, work, StepSettings(s_targets, rank, ckpt)).values())
    acts2 = activation_bytes(student, work, checkpointing=ckpt, rank=rank, heads=s_targets + 1, chunk=cfg.loss.chunk_size)
    trained2 = verbalizer_params(student.text, s_targets) + lora_params(student.text, rank)
    signal = (
        (t_targets + 1)
        * work.response
        * wire_bytes_per_token_per_layer(topk, cfg.signal.tail_samples, cfg.signal.storage, teacher.text.vocab)
    )
    step2 = StageCost(
        "interact",
        (teacher_side, student_training(trained2, acts2, cfg.stages.interact.batch_size, f2s)),
        signal_bytes=signal,
    )

    # step 3: the student's LLM fully
    f3 = sum(sft_flops(student, work, StepSettings(checkpointing=ckpt)).values())
    acts3 = activation_bytes(student, work, checkpointing=ckpt, full=True, loss="ce", chunk=cfg.loss.chunk_size)
    step3 = StageCost(
        "sft", (student_training(student.text.params(), acts3, cfg.stages.sft.batch_size, f3, layout.sft_workers or workers),)
    )
    return [step1, step2, step3]


def days(stages: list[StageCost], samples: int) -> float:
    """Days for every stage to see ``samples`` samples once, one stage after the other."""
    return sum(samples / stage.rate for stage in stages) / 86400


def gpu_hours(stage: StageCost, layout: Layout, samples: int) -> float:
    """GPU-hours of a stage: every GPU of the layout held while it sees ``samples`` samples."""
    return layout.gpus * samples / stage.rate / 3600


def load_run(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Any, ModelShape, ModelShape]:
    """A run config and its models' shapes, without the checkpoints on this machine.

    The shapes come from each ``<model>.path``'s ``config.json`` where it exists, else from
    :data:`KNOWN_CHECKPOINTS` by the directory's name; the config is validated with the paths
    cleared (validation wants them on disk).
    """
    from omegaconf import OmegaConf  # noqa: PLC0415

    from vlsi_ray.config import ConfigError, load_config  # noqa: PLC0415

    raw = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    shapes = []
    for role in ("teacher", "student"):
        checkpoint = OmegaConf.select(raw, f"{role}.path")
        if not checkpoint:
            raise ConfigError(f"{role}.path is not set in {path}; the cost model needs the checkpoint it would load.")
        shapes.append(ModelShape.from_checkpoint(checkpoint))
    cfg = load_config(path, [*overrides, "teacher.path=null", "student.path=null"])
    return cfg, shapes[0], shapes[1]
