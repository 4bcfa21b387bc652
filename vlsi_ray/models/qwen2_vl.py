"""Qwen2-VL: the family spec, its PIL image processor, and tiny offline builders.

Image tokens: the processor resizes to multiples of 28 px (14-px patches, 2×2 merge) within
``[min_pixels, max_pixels]``; one image gives ``t·h·w / 4`` placeholder tokens (``image_grid_thw``
``[1, h, w]`` in 14-px patches). :func:`build_image_processor` pins ``min_pixels = max_pixels =
image_size²`` so every image becomes ``image_size/14`` patches a side: 112 px -> 8×8 patches ->
**16 image tokens**. transformers 5.24 needs ``mm_token_type_ids`` (1 at image-pad positions) in the
model call whenever ``image_grid_thw`` is passed (M-RoPE positions are computed from it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vlsi_ray.models.backbone import Backbone, instantiate_tiny
from vlsi_ray.models.families import FamilySpec, HubLayout

FAMILY = "qwen2_vl"
#: Qwen2 special tokens in the real checkpoints' id order (151643 ...).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
#: Qwen2-VL-Instruct's chat template (default system prompt, one vision block per image part).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLE_DEFAULTS = {
    "teacher": dict(hidden_size=128, num_layers=8, num_heads=4, intermediate_size=384, vision_embed_dim=64, vision_depth=4),
    "student": dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=192, vision_embed_dim=32, vision_depth=1),
}
OVERRIDES = {"hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vision_depth",
             "vision_embed_dim", "vision_num_heads", "vocab_size", "seed", "image_size", "init_gain"}  # fmt: skip


def _image_processor_class():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: PLC0415 - transformers loads on use, after the offline defaults

    return Qwen2VLImageProcessorPil


def _model_class():
    from transformers import Qwen2VLForConditionalGeneration  # noqa: PLC0415 - transformers loads on use, after the offline defaults

    return Qwen2VLForConditionalGeneration


RESOLUTION_FIELDS = ("size", "patch_size", "temporal_patch_size", "merge_size")


def build_image_processor(image_size: int = 112, **kwargs):
    """PIL image processor giving ``(image_size/28)²`` tokens for any image (112 px -> 16)."""
    if image_size % 28:
        raise ValueError(f"image_size={image_size} must be a multiple of 28 (14-px patches merged 2×2).")
    pixels = image_size * image_size
    return _image_processor_class()(min_pixels=pixels, max_pixels=pixels, **kwargs)


def process_image(image_processor, image) -> dict[str, Tensor]:
    """One PIL image -> ``pixel_values [n_patches, 3·2·14·14]`` and ``image_grid_thw [3]``."""
    out = image_processor(images=[image], return_tensors="np")
    return {
        "pixel_values": torch.from_numpy(np.ascontiguousarray(out["pixel_values"])),
        "image_grid_thw": torch.from_numpy(out["image_grid_thw"][0]),
    }


def count_image_tokens(image_processor, processed: dict[str, Tensor]) -> int:
    """``t·h·w / merge²`` placeholder tokens for one processed image."""
    return int(processed["image_grid_thw"].prod()) // image_processor.merge_size**2


def batch_vision(processed: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Images in sequence order -> ``pixel_values [Σ patches, D]``, ``image_grid_thw [N, 3]``."""
    return {
        "pixel_values": torch.cat([p["pixel_values"] for p in processed]),
        "image_grid_thw": torch.stack([p["image_grid_thw"] for p in processed]).long(),
    }


def set_resolution(image_processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """``images.min_pixels`` / ``images.max_pixels``: the pixel budget an image is resized into
    (multiples of 28 px), i.e. ``min_pixels/784 .. max_pixels/784`` image tokens."""
    from transformers.image_utils import SizeDict  # noqa: PLC0415 - transformers loads on use, after the offline defaults

    low = image_processor.size["shortest_edge"] if min_pixels is None else min_pixels
    high = image_processor.size["longest_edge"] if max_pixels is None else max_pixels
    if low > high:
        raise ValueError(f"images.min_pixels={low} exceeds images.max_pixels={high}; lower min_pixels or raise max_pixels.")
    image_processor.size = SizeDict(shortest_edge=low, longest_edge=high)


def hub_text_keys(text) -> dict:
    """The Qwen2 language model's keys as the released (4.x) configs write them, flat."""
    rope = text.rope_parameters
    return {
        "attention_dropout": 0.0, "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
        "hidden_act": text.hidden_act, "hidden_size": text.hidden_size, "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size, "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers, "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps, "rope_theta": rope["rope_theta"], "sliding_window": 32768,
        "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False, "vocab_size": text.vocab_size,
    }  # fmt: skip


def hub_config(config, dtype: str) -> dict:
    """``config.json`` as Qwen/Qwen2-VL-*-Instruct ships it (flat text keys, ``rope_scaling``, ``torch_dtype``)."""
    vision = config.vision_config
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        **hub_text_and_token_keys(config),
        "vision_config": {
            "depth": vision.depth, "embed_dim": vision.embed_dim, "mlp_ratio": vision.mlp_ratio, "num_heads": vision.num_heads,
            "in_chans": 3, "hidden_size": vision.hidden_size, "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size, "spatial_patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size,
        },
        "torch_dtype": dtype, "transformers_version": "4.41.2",
    }  # fmt: skip


def hub_text_and_token_keys(config) -> dict:
    """The keys Qwen2-VL and Qwen2.5-VL releases share: flat text keys, token ids, ``rope_scaling``."""
    return {
        **hub_text_keys(config.text_config),
        "vision_start_token_id": config.vision_start_token_id, "vision_end_token_id": config.vision_end_token_id,
        # <|vision_pad|>: the special token after <|vision_end|> (SPECIAL_TOKENS order); transformers 5 drops the key
        "vision_token_id": config.vision_end_token_id + 1, "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "rope_scaling": {"type": "mrope", "mrope_section": list(config.text_config.rope_parameters["mrope_section"])},
    }  # fmt: skip


def hub_weight_name(name: str) -> str:
    """``model.language_model.*`` -> ``model.*``, ``model.visual.*`` -> ``visual.*`` (the released shards' names)."""
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    return name


def hub_preprocessor(image_processor) -> dict:
    """``preprocessor_config.json`` as released: ``min_pixels``/``max_pixels`` at the top level."""
    return {
        "min_pixels": image_processor.size["shortest_edge"], "max_pixels": image_processor.size["longest_edge"],
        "patch_size": image_processor.patch_size, "temporal_patch_size": image_processor.temporal_patch_size,
        "merge_size": image_processor.merge_size, "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std), "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }  # fmt: skip


def hub_generation_config(tokenizer) -> dict:
    """``generation_config.json`` as Qwen2-VL-Instruct ships it (sampling defaults the project's greedy decoding overrides)."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "bos_token_id": ids("<|endoftext|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "do_sample": True,
        "eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")],
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.37.0",
    }


def _mrope_section(head_dim: int) -> list[int]:
    # Real Qwen2-VL splits head_dim/2 = 64 rotary pairs as 16/24/24 (t/h/w); keep that ratio.
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_text_config(tokenizer, sizes: dict) -> dict:
    """The Qwen2 language model of a tiny Qwen2-VL / Qwen2.5-VL: sizes, M-RoPE, the tokenizer's special ids."""
    heads = sizes["num_heads"]
    hidden = sizes["hidden_size"]
    if hidden % heads or (hidden // heads) % 8:
        raise ValueError(f"hidden_size={hidden} / num_heads={heads} must give a head_dim that is a multiple of 8.")
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=sizes["vocab_size"], hidden_size=hidden, intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_layers"], num_attention_heads=heads,
        num_key_value_heads=sizes.get("num_kv_heads") or max(1, heads // 2), max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": _mrope_section(hidden // heads)},
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )  # fmt: skip


def special_token_ids(tokenizer) -> dict:
    """The multimodal token ids of a Qwen2-VL / Qwen2.5-VL config, from the tokenizer."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def tiny_config(tokenizer, **sizes):
    """A ``Qwen2VLConfig`` with the given sizes and the tokenizer's special-token ids."""
    from transformers import Qwen2VLConfig  # noqa: PLC0415 - transformers loads on use, after the offline defaults

    vision_heads = sizes.get("vision_num_heads") or max(1, sizes["vision_embed_dim"] // 16)
    vision = dict(
        depth=sizes["vision_depth"], embed_dim=sizes["vision_embed_dim"], num_heads=vision_heads, hidden_size=sizes["hidden_size"],
        mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
    )  # fmt: skip
    return Qwen2VLConfig(
        text_config=tiny_text_config(tokenizer, sizes),
        vision_config=vision,
        tie_word_embeddings=False,
        **special_token_ids(tokenizer),
    )


def default_vocab_size(tokenizer) -> int:
    """LM head rows for a tiny model: ``len(tokenizer)`` rounded up to 64, as real heads are padded."""
    return -(-len(tokenizer) // 64) * 64


def resolve_sizes(role: str, tokenizer, overrides: dict) -> dict:
    """Role defaults updated with ``overrides``; unknown keys are refused."""
    if role not in ROLE_DEFAULTS:
        raise ValueError(f"role={role!r} is not one of teacher, student.")
    unknown = sorted(set(overrides) - OVERRIDES)
    if unknown:
        raise TypeError(f"build_tiny got unknown override {unknown[0]!r}; allowed: {', '.join(sorted(OVERRIDES))}.")
    sizes = {**ROLE_DEFAULTS[role], "vocab_size": default_vocab_size(tokenizer), "seed": 0, "image_size": 112, "init_gain": 1.0}
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    return sizes


def build_tiny(role: str, tokenizer, **overrides) -> Backbone:
    """A randomly initialised tiny Qwen2-VL (deterministic given ``seed``), built offline.

    Defaults: teacher LM 128×8 (vision 64×4), student LM 64×4 (vision 32×1); overrides: hidden_size,
    num_layers, num_heads, num_kv_heads, intermediate_size, vision_depth, vision_embed_dim,
    vision_num_heads, vocab_size, seed, image_size, init_gain (see :func:`fan_in_init`).
    """
    sizes = resolve_sizes(role, tokenizer, overrides)
    gain = sizes.pop("init_gain")
    config = tiny_config(tokenizer, **sizes)
    image_processor = build_image_processor(sizes["image_size"])
    return instantiate_tiny(FAMILY, _model_class(), config, tokenizer, image_processor, role, sizes["seed"], gain)


SPEC = FamilySpec(
    name=FAMILY,
    model_type="qwen2_vl",
    model_class=_model_class,
    image_processor_class=_image_processor_class,
    special_tokens=SPECIAL_TOKENS,
    pad_token="<|endoftext|>",
    eos_token="<|im_end|>",
    image_token="<|image_pad|>",
    chat_template=CHAT_TEMPLATE,
    model_input_names=("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"),
    group_prefixes=(
        ("model.visual.merger.", "projector"),
        ("model.visual.", "vision"),
        ("model.language_model.embed_tokens.", "embeddings"),
        ("model.language_model.", "language"),
        ("lm_head.", "head"),
    ),
    build_image_processor=build_image_processor,
    process_image=process_image,
    count_image_tokens=count_image_tokens,
    batch_vision=batch_vision,
    uses_mm_token_type_ids=True,
    build_tiny=build_tiny,
    resolution_fields=RESOLUTION_FIELDS,
    set_resolution=set_resolution,
    hub=HubLayout(
        config=hub_config, weight_name=hub_weight_name, preprocessor=hub_preprocessor, generation_config=hub_generation_config
    ),
)
