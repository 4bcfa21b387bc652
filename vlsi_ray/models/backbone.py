"""One small interface over the transformers VLM classes that VLsI distils between.

A :class:`Backbone` wraps a stock ``*ForConditionalGeneration`` model with its tokenizer and image
processor and exposes what the method needs: every decoder block's output, the backbone's own final
norm and LM head (shared by the verbalizers), parameter groups, LoRA on the language model only, and
a local checkpoint format, and the model's precision (:mod:`vlsi_ray.models.precision`): its compute
dtype, the autocast its forward runs under, and the dtype its checkpoint was saved in. Family
specifics (class, module paths, chat template, image-token counts) live in one module per family
(``qwen2_vl.py``, ``qwen2_5_vl.py``, ``llava_onevision.py``), registered in
:data:`vlsi_ray.models.families.FAMILIES`.

Hidden-state convention (what transformers 5 returns, verified in tests/models/test_backbones.py):
``hidden_states`` has ``L + 1`` entries ``[B, T, d]``: the input embeddings (image features already
scattered in), then the output of block ``k`` at index ``k``. The last entry is already passed
through the final norm (``lm_head(hidden_states[-1]) == logits``); the others are not. So the
"logit lens" of block ``k < L`` is ``lm_head(final_norm(hidden_states[k]))``, while applying
``final_norm`` to ``hidden_states[L]`` normalises twice: use :meth:`Backbone.lens_input`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

# FAMILIES, FamilySpec, UnsupportedModelError and get_family live in families.py (the registry); re-exported here.
from vlsi_ray.models.families import (  # noqa: F401
    BACKBONE_FILE,
    FAMILIES,
    FamilySpec,
    UnsupportedModelError,
    detect_family,
    get_family,
)
from vlsi_ray.models.precision import autocast, dtype_name, parse_dtype, round_to_dtype

#: LoRA targets: the language model's attention and MLP projections, never the vision tower
#: (SigLIP also has ``self_attn.q_proj``, hence a full-match regex rather than suffixes).
LM_LORA_TARGETS = (
    r"model\.language_model\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)
PARAMETER_GROUPS = ("vision", "projector", "embeddings", "language", "head")


class IncompatibleModelsError(ValueError):
    """Teacher and student cannot be distilled into each other (family, vocabulary, image tokens)."""


def build_image_processor(family: str, image_size: int = 112, **kwargs):
    """The family's PIL image processor sized so one ``image_size``² image gives few tokens."""
    return get_family(family).build_image_processor(image_size=image_size, **kwargs)


@dataclass
class BackboneOutput:
    """``hidden_states``: ``L + 1`` tensors ``[B, T, d]`` (see module docstring); ``logits [B, T, V]``
    (None when :meth:`Backbone.forward` was asked not to compute them)."""

    hidden_states: tuple[Tensor, ...]
    logits: Tensor | None


def _get_path(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


class Backbone:
    """A transformers VLM plus its tokenizer and image processor, behind one interface.

    ``compute_dtype`` is the dtype matmuls run in (default: the model's parameter dtype); trainable
    parameters may be float32 masters while the forward autocasts to it. ``checkpoint_dtype`` is the
    dtype the model was saved in (default: the compute dtype): :meth:`save_pretrained` writes it.
    """

    def __init__(
        self,
        family: str,
        model: nn.Module,
        tokenizer,
        image_processor,
        name: str | None = None,
        compute_dtype: torch.dtype | None = None,
        checkpoint_dtype: torch.dtype | None = None,
    ):
        get_family(family)  # fail early on an unknown family
        self.family = family
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name or f"in-memory {family} model"
        self.compute_dtype = compute_dtype or next(model.parameters()).dtype
        self.checkpoint_dtype = checkpoint_dtype or self.compute_dtype
        self._requires_grad_before_lora: dict[str, bool] | None = None

    # ----- structure ------------------------------------------------------------------------------
    @property
    def spec(self) -> FamilySpec:
        return get_family(self.family)

    @property
    def base_model(self) -> nn.Module:
        """The ``*ForConditionalGeneration`` module, also when ``model`` is a peft wrapper."""
        if self.lora_active:
            return self.model.get_base_model()
        return self.model

    @property
    def lora_active(self) -> bool:
        return hasattr(self.model, "peft_config") and hasattr(self.model, "get_base_model")

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return _get_path(self.base_model, "model.language_model.layers")

    @property
    def final_norm(self) -> nn.Module:
        return _get_path(self.base_model, "model.language_model.norm")

    @property
    def lm_head(self) -> nn.Linear:
        return self.base_model.lm_head

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def hidden_size(self) -> int:
        return self.base_model.config.get_text_config().hidden_size

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head (may exceed ``len(tokenizer)``: real checkpoints pad their heads)."""
        return self.lm_head.weight.shape[0]

    @property
    def image_token_id(self) -> int:
        return self.base_model.config.image_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.spec.eos_token)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (trainable float32 masters aside, the dtype of the weights)."""
        return self.compute_dtype

    @property
    def lora_target_modules(self) -> str:
        """Regex (peft full-match) for the language model's attention + MLP projections."""
        return LM_LORA_TARGETS

    # ----- forward --------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], logits: bool = True) -> BackboneOutput:
        """Run the model on a collated batch (extra keys such as ``labels``/``ids`` are ignored).

        ``input_ids [B, T]``, ``attention_mask [B, T]`` and the family's vision inputs ->
        ``hidden_states`` (``L + 1`` × ``[B, T, d]``) and ``logits [B, T, V]``. ``logits=False``
        skips the LM head over every position (``logits`` is None): the training objectives apply
        their heads to the response positions only, and ``[B, T, V]`` is large at a real vocab.
        """
        keep = {} if logits else {"logits_to_keep": 1}
        with self.autocast():
            out = self.model(**self.model_inputs(batch), output_hidden_states=True, use_cache=False, return_dict=True, **keep)
        return BackboneOutput(hidden_states=tuple(out.hidden_states), logits=out.logits if logits else None)

    def autocast(self):
        """Context in which matmuls run in the compute dtype (a no-op in float32): wrap every use of
        the model's weights in it, heads included, so float32 master weights compute in low precision."""
        return autocast(self.device, self.compute_dtype)

    def round_to_compute_dtype(self) -> None:
        """After training: cast the float32 master weights back to the compute dtype, in place."""
        round_to_dtype(self.model, self.compute_dtype)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder (and vision) block in backward instead of storing its activations.

        Non-reentrant checkpointing: gradients reach LoRA adapters and float32 masters without the
        inputs having to require grad, and autocast is replayed in the recomputation. Active in
        train mode only (transformers' convention). ref: Chen et al. 2016, arXiv:1604.06174.
        """
        model = self.base_model
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            self._frozen_inputs_stay_frozen()
        elif model.is_activation_checkpointing:
            model.activation_checkpointing_disable()

    def _frozen_inputs_stay_frozen(self) -> None:
        """Remove the hooks that make every embedding output require grad.

        transformers (enabling checkpointing) and peft (wrapping a checkpointing model) add them for
        reentrant checkpointing, which needs a block's input to require grad. Non-reentrant checkpointing
        does not; with them the frozen vision tower's patch embedding requires grad too, and every
        step recomputes and backpropagates the whole ViT for nothing (``vlsi_ray.scale`` counts it).
        """
        self.base_model.disable_input_require_grads()

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The family's model inputs of a collated batch, on the model's device (floats in the compute dtype)."""
        device, dtype = self.device, self.dtype
        inputs = {}
        for key in self.spec.model_input_names:
            value = batch.get(key)
            if value is None:
                continue
            if isinstance(value, Tensor):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            inputs[key] = value
        return inputs

    __call__ = forward

    def lens_input(self, hidden_states: tuple[Tensor, ...], k: int) -> Tensor:
        """What the LM head should read for block ``k`` (1-based; ``k = L`` or ``-1`` is the last).

        ``final_norm(hidden_states[k])`` for ``k < L``; ``hidden_states[L]`` as is, because it is
        already normed. Shapes ``[..., d]`` -> ``[..., d]``.
        """
        last = len(hidden_states) - 1
        if k == -1 or k == last:
            return hidden_states[last]
        return self.final_norm(hidden_states[k])

    # ----- parameters -----------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Partition of every parameter into vision, projector, embeddings, language, head.

        Names are those of the base model (LoRA weights, when applied, fall in ``language``).
        """
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in PARAMETER_GROUPS}
        for name, param in self.base_model.named_parameters():
            group = next((g for prefix, g in self.spec.group_prefixes if name.startswith(prefix)), None)
            if group is None:
                raise RuntimeError(f"parameter {name} of {self.name} matches no group; add its prefix to the {self.family} spec.")
            groups[group].append((name, param))
        return groups

    def apply_lora(self, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """Wrap ``model`` with peft LoRA on :attr:`lora_target_modules` (B zero-initialised).

        peft freezes every base parameter; :meth:`merge_lora` restores the previous flags.
        """
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - peft loads on use, with transformers

        if self.lora_active:
            raise RuntimeError(f"{self.name} already has LoRA applied; call merge_lora() first.")
        self._requires_grad_before_lora = {n: p.requires_grad for n, p in self.model.named_parameters()}
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=self.lora_target_modules, bias="none")
        self.model = get_peft_model(self.model, config)
        self._frozen_inputs_stay_frozen()

    def merge_lora(self) -> None:
        """Merge the LoRA weights into the base model and drop the peft wrapper."""
        if not self.lora_active:
            raise RuntimeError(f"{self.name} has no LoRA to merge; call apply_lora() first.")
        self.model = self.model.merge_and_unload()
        flags = self._requires_grad_before_lora or {}
        for name, param in self.model.named_parameters():
            param.requires_grad_(flags.get(name, True))
        self._requires_grad_before_lora = None

    # ----- checkpoints ----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: torch.dtype | str | None = None) -> None:
        """Write model, tokenizer, image processor and ``vlsi_backbone.json`` into ``path``.

        Weights are written in ``dtype`` (default: :attr:`checkpoint_dtype`, the dtype the base
        checkpoint was released in), whatever the dtypes in memory; ``config.json`` says so.
        """
        if self.lora_active:
            raise RuntimeError(f"{self.name} still has LoRA adapters; call merge_lora() before save_pretrained().")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dtype = parse_dtype(dtype) or self.checkpoint_dtype
        if all(p.dtype == dtype for p in self.model.parameters() if p.is_floating_point()):
            self.model.save_pretrained(path)
        else:  # cast copies, leaving the model in memory as it is
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.model.state_dict().items()}
            self.model.save_pretrained(path, state_dict=state)
            _set_config_dtype(path / "config.json", dtype)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (path / BACKBONE_FILE).write_text(json.dumps({"family": self.family, "format": 1}, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: str | dict | None = None,
        attn_implementation: str | None = None,
        tensor_parallel: int = 1,
    ) -> Backbone:
        """Load a backbone from a local directory (never a hub); the family is auto-detected.

        ``dtype`` is the compute dtype the weights are loaded in (default: the dtype they were saved
        in, ``config.json``'s ``dtype``/``torch_dtype``). ``device_map`` (e.g. ``"auto"``) spreads the
        model over the visible GPUs instead of moving it to ``device``: a teacher too large for one
        GPU (Qwen2-VL-72B) on a multi-GPU replica. ``attn_implementation``: ``sdpa``, ``eager`` or
        ``flash_attention_2`` (None: transformers' default). ``tensor_parallel`` > 1: this process is
        one rank of an initialised ``torch.distributed`` group of that size, and loads its shard of the
        language model (transformers' tensor-parallel plan: attention and MLP projections split by
        heads and columns, embeddings and LM head by vocabulary; the vision tower replicated); outputs
        (hidden states, the LM head's logits) come back whole on every rank.
        """
        path = _checkpoint_dir(path)
        family = detect_family(path)
        spec = get_family(family)
        saved = saved_dtype(path)
        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": parse_dtype(dtype) or "auto"}
        if device_map is not None:
            kwargs["device_map"] = device_map
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if tensor_parallel > 1:
            from transformers.distributed import DistributedConfig  # noqa: PLC0415 - loads on use

            kwargs["distributed_config"] = DistributedConfig(tp_size=tensor_parallel)
        model = spec.model_class().from_pretrained(str(path), **kwargs)
        tokenizer, image_processor = _load_processors(path, spec, model.config)
        if device is not None and device_map is None and tensor_parallel == 1:  # a rank's shards load on its device
            model.to(device)
        return cls(family, model, tokenizer, image_processor, name=str(path), checkpoint_dtype=saved)


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} does not exist; pass a local checkpoint directory (hubs are never used)."
        )
    return path


def saved_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint directory's weights were saved in, from ``config.json`` (``dtype`` in
    transformers 5, ``torch_dtype`` in the released 4.x files), or None when it does not say."""
    config = json.loads((Path(path) / "config.json").read_text())
    for source in (config, config.get("text_config") or {}):
        value = source.get("dtype") or source.get("torch_dtype")
        if isinstance(value, str) and value != "auto":
            try:
                return parse_dtype(value)
            except ValueError:
                return None
    return None


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Make ``config.json`` (and its sub-configs) name ``dtype``: the weights were cast on the way out."""

    def fix(node):
        if isinstance(node, dict):
            return {
                k: (dtype_name(dtype) if k in ("dtype", "torch_dtype") and isinstance(v, str) else fix(v))
                for k, v in node.items()
            }
        return node

    config_file.write_text(json.dumps(fix(json.loads(config_file.read_text())), indent=2, sort_keys=True) + "\n")


@dataclass
class ModelInfo:
    """What :func:`check_compatible` reads from a checkpoint, loaded without its weights.

    The same attributes as a :class:`Backbone` (``family``, ``name``, ``tokenizer``,
    ``image_processor``, ``vocab_size``, ``image_token_id``, ``num_layers``, ``hidden_size``,
    ``checkpoint_dtype``, ``spec``), from ``config.json``, the tokenizer and the image processor, so a
    72B/7B pair is checked in seconds on a CPU-only head.
    """

    family: str
    name: str
    tokenizer: Any
    image_processor: Any
    vocab_size: int  # rows of the LM head: the text config's vocab_size
    image_token_id: int
    config: Any = None  # the transformers config

    @property
    def spec(self) -> FamilySpec:
        return get_family(self.family)

    @property
    def num_layers(self) -> int:
        return self.config.get_text_config().num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.get_text_config().hidden_size

    @property
    def checkpoint_dtype(self) -> torch.dtype | None:
        return saved_dtype(self.name)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelInfo:
        """Read the checkpoint directory ``path`` (never a hub) without loading any weight."""
        from transformers import AutoConfig  # noqa: PLC0415 - transformers loads on use, after the offline defaults

        path = _checkpoint_dir(path)
        family = detect_family(path)
        spec = get_family(family)
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        tokenizer, image_processor = _load_processors(path, spec, config)
        return cls(
            family, str(path), tokenizer, image_processor, config.get_text_config().vocab_size, config.image_token_id, config
        )


def _load_processors(path: Path, spec: FamilySpec, config) -> tuple[Any, Any]:
    """The tokenizer (with the family's chat template if none was saved) and image processor in ``path``."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - transformers loads on use, after the offline defaults

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = _saved_chat_template(path) or spec.chat_template
    image_processor = spec.image_processor_class().from_pretrained(str(path), local_files_only=True)
    if spec.prepare_loaded is not None:
        spec.prepare_loaded(config, image_processor)
    return tokenizer, image_processor


def _saved_chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None


def load_backbone(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
) -> Backbone:
    """Same as :meth:`Backbone.from_pretrained`."""
    return Backbone.from_pretrained(path, device=device, dtype=dtype, attn_implementation=attn_implementation)


#: Image sizes (height, width) probed to compare teacher/student image-token counts.
PROBE_IMAGE_SIZES = ((112, 112), (224, 168), (84, 252))


def image_token_count(backbone: Backbone | ModelInfo, height: int, width: int) -> int:
    """Placeholder tokens ``backbone`` puts in the sequence for one ``height × width`` image."""
    image = Image.new("RGB", (width, height))
    processed = backbone.spec.process_image(backbone.image_processor, image)
    return backbone.spec.count_image_tokens(backbone.image_processor, processed)


def _special_tokens(backbone: Backbone | ModelInfo) -> set[str]:
    tokenizer = backbone.tokenizer
    added = {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    return set(tokenizer.all_special_tokens) | set(backbone.spec.special_tokens) | added


def check_compatible(teacher: Backbone | ModelInfo, student: Backbone | ModelInfo) -> None:
    r"""Raise :class:`IncompatibleModelsError` unless the pair can be distilled token for token.

    Takes loaded backbones or weight-free :class:`ModelInfo`\ s (the Ray runner checks paths that way).

    Checks: same family; identical vocabulary on the shared prefix of the two LM heads (ids below
    ``min(V_t, V_s)``); identical special-token ids; identical image-resolution settings of the two
    image processors (the family's ``resolution_fields``, named when they differ) and image-token
    counts on probe images.
    """
    t, s = teacher, student
    pair = f"teacher {t.name} and student {s.name}"
    if t.family != s.family:
        raise IncompatibleModelsError(
            f"teacher {t.name} is a {t.family} model but student {s.name} is a {s.family} model; "
            f"pick a {t.family} student (VLsI distils within one family)."
        )
    shared = min(t.vocab_size, s.vocab_size)
    t_vocab = {i: tok for tok, i in t.tokenizer.get_vocab().items() if i < shared}
    s_vocab = {i: tok for tok, i in s.tokenizer.get_vocab().items() if i < shared}
    for i in sorted(set(t_vocab) | set(s_vocab)):
        if t_vocab.get(i) != s_vocab.get(i):
            raise IncompatibleModelsError(
                f"{pair} disagree at token id {i} ({t_vocab.get(i)!r} vs {s_vocab.get(i)!r}) within the shared "
                f"{shared}-row head prefix; use a student whose tokenizer has the teacher's vocabulary order."
            )
    specials = sorted(_special_tokens(t) | _special_tokens(s))
    for tok in specials:
        t_id, s_id = t.tokenizer.convert_tokens_to_ids(tok), s.tokenizer.convert_tokens_to_ids(tok)
        if t_id != s_id:
            raise IncompatibleModelsError(
                f"{pair} give special token {tok!r} different ids ({t_id} vs {s_id}); use the teacher's tokenizer for the student."
            )
    if t.image_token_id != s.image_token_id:
        raise IncompatibleModelsError(
            f"{pair} use different image token ids in their configs ({t.image_token_id} vs {s.image_token_id}); "
            "set the student's image_token_id to the teacher's."
        )
    for field in t.spec.resolution_fields:
        t_value, s_value = _plain(getattr(t.image_processor, field, None)), _plain(getattr(s.image_processor, field, None))
        if t_value != s_value:
            raise IncompatibleModelsError(
                f"{pair} have image processors with different {field} ({t_value} vs {s_value}), so one image would give "
                "them different numbers of image tokens; set images.min_pixels / images.max_pixels to give both one "
                "resolution, or give the student the teacher's preprocessor_config.json."
            )
    for height, width in PROBE_IMAGE_SIZES:
        n_t, n_s = image_token_count(t, height, width), image_token_count(s, height, width)
        if n_t != n_s:
            raise IncompatibleModelsError(
                f"{pair} turn a {height}x{width} image into {n_t} vs {n_s} image tokens; give the student the teacher's "
                "image processor settings (preprocessor_config.json) so both see the same token sequence."
            )


def _plain(value: Any) -> Any:
    """A processor setting as plain comparable data (SizeDict -> dict of its set keys, tuples -> lists)."""
    if hasattr(value, "__dataclass_fields__"):
        value = {k: v for k, v in vars(value).items() if v is not None}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def fan_in_init(model: nn.Module, gain: float = 1.0) -> None:
    """Re-initialise every ``nn.Linear`` weight except the LM head with N(0, gain²/fan_in).

    transformers initialises with a fixed std (``initializer_range=0.02``), tuned for widths of
    several hundred and more. At the tiny widths of the CPU demo (64–128) that leaves attention
    logits near zero, so attention is uniform and a from-scratch model takes thousands of steps to
    attend to the one image token that answers a question (``tests/models/test_init.py`` checks the
    scale; ``docs/RESULTS.md`` the effect). ``gain=0`` keeps the transformers initialisation.
    """
    if gain <= 0:
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            nn.init.normal_(module.weight, std=gain / module.in_features**0.5)


def instantiate_tiny(
    family: str, model_class: type, config, tokenizer, image_processor, role: str, seed: int, init_gain: float
) -> Backbone:
    """A randomly initialised tiny model of ``family``: seeded, width-scaled init, eval mode."""
    torch.manual_seed(seed)
    model = model_class(config)
    fan_in_init(model, init_gain)
    model.eval()
    return Backbone(family, model, tokenizer, image_processor, name=f"tiny {family} {role}")
