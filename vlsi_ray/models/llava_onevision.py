"""LLaVA-OneVision (SigLIP vision tower + Qwen2 LM): family spec, image processor, tiny builders.

Image tokens. The real model ("anyres_max_9") encodes a base view of the whole image plus a grid of
crops chosen from ``image_grid_pinpoints``, each crop ``image_size`` px through SigLIP with
``patch_size`` px patches (``n = (image_size/patch_size)²`` tokens per crop, no CLS,
``vision_feature_select_strategy="full"``); the crop grid is unpadded to the image's aspect ratio and
each of its rows ends with an ``image_newline`` token. Tiny choice here (real: 384 px crops, 14-px
patches, 36 pinpoints up to 2304 px): ``image_size=112``, ``patch_size=28``, pinpoints
``[[112, 112]]``. A 112×112 image then gives a 4×4 base view (16) + one 4×4 crop (16) + 4 newlines
= **36 image tokens**; a 28-px patch is one cell of the synthetic task's 4×4 grid. (With 14-px
patches the same image would give 64 + 64 + 8 = 136 tokens.)

The image processor carries ``num_image_tokens`` (tokens per crop) and
``vision_feature_select_strategy`` so the collator can count placeholders without the model config;
:meth:`Backbone.from_pretrained` fills them from config.json for checkpoints that lack them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from vlsi_ray.models.backbone import Backbone, FamilySpec, instantiate_tiny
from vlsi_ray.models.qwen2_vl import resolve_sizes

FAMILY = "llava_onevision"
#: Qwen2 base tokens then LLaVA-OneVision's added image/video tokens (151643 ... 151647).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
#: llava-hf's LLaVA-OneVision template (images first, then "\n" + text for user turns). One change:
#: assistant text follows "<|im_start|>assistant\n" directly (llava-hf adds another "\n"), so the
#: generation prompt is an exact prefix of the training string.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] != 'assistant' %}{{ '\n' }}{% endif %}{{ content['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PATCH_SIZE = 28


def _image_processor_class():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil


def _model_class():
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration


def build_image_processor(image_size: int = 112, patch_size: int = PATCH_SIZE, pinpoints: list | None = None, **kwargs):
    """PIL image processor for ``image_size`` crops; carries the per-crop token count."""
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}.")
    return _image_processor_class()(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints or [[image_size, image_size]],
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        **kwargs,
    )


def process_image(image_processor, image) -> dict[str, Tensor]:
    """One PIL image -> ``pixel_values [1 + crops, 3, S, S]`` and ``image_sizes [2]`` (H, W)."""
    out = image_processor(images=[image], return_tensors="np")
    return {
        "pixel_values": torch.from_numpy(np.ascontiguousarray(out["pixel_values"][0])),
        "image_sizes": torch.as_tensor(out["image_sizes"][0], dtype=torch.long),
    }


def count_image_tokens(image_processor, processed: dict[str, Tensor]) -> int:
    """Base view + unpadded crop grid + one newline per grid row (LlavaOnevisionProcessor's rule)."""
    from transformers.image_processing_utils import select_best_resolution

    orig_h, orig_w = (int(x) for x in processed["image_sizes"])
    crop_h, crop_w = processed["pixel_values"].shape[-2:]
    best_h, best_w = select_best_resolution([orig_h, orig_w], image_processor.image_grid_pinpoints)
    side = int(math.isqrt(image_processor.num_image_tokens))
    cur_h, cur_w = side * (best_h // crop_h), side * (best_w // crop_w)
    if orig_w / orig_h > cur_w / cur_h:
        cur_h -= 2 * ((cur_h - int(round(orig_h * (cur_w / orig_w), 7))) // 2)
    else:
        cur_w -= 2 * ((cur_w - int(round(orig_w * (cur_h / orig_h), 7))) // 2)
    unpadded, newlines = cur_h * cur_w, cur_h
    ratio = math.sqrt(cur_h * cur_w / (9 * side**2))  # "anyres_max_9"
    if ratio > 1.1:
        unpadded, newlines = int(cur_h // ratio) * int(cur_w // ratio), int(cur_h // ratio)
    total = image_processor.num_image_tokens + unpadded + newlines
    return total - 1 if getattr(image_processor, "vision_feature_select_strategy", "full") == "default" else total


def batch_vision(processed: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Images -> ``pixel_values [N, max crops, 3, S, S]`` (zero-padded) and ``image_sizes [N, 2]``."""
    most = max(p["pixel_values"].shape[0] for p in processed)
    pixels = torch.zeros((len(processed), most, *processed[0]["pixel_values"].shape[1:]))
    for i, p in enumerate(processed):
        pixels[i, : p["pixel_values"].shape[0]] = p["pixel_values"]
    return {"pixel_values": pixels, "image_sizes": torch.stack([p["image_sizes"] for p in processed])}


def prepare_loaded(model_config, image_processor) -> None:
    """Give a loaded image processor the per-crop token count the collator needs."""
    vision = model_config.vision_config
    if getattr(image_processor, "num_image_tokens", None) is None:
        image_processor.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    image_processor.vision_feature_select_strategy = model_config.vision_feature_select_strategy


def tiny_config(tokenizer, image_size: int = 112, patch_size: int = PATCH_SIZE, **sizes):
    """A ``LlavaOnevisionConfig`` (SigLIP + Qwen2) with the given sizes and the tokenizer's ids."""
    from transformers import LlavaOnevisionConfig

    heads, hidden = sizes["num_heads"], sizes["hidden_size"]
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden_size={hidden} / num_heads={heads} must give an even head_dim.")
    ids = tokenizer.convert_tokens_to_ids
    vision_dim = sizes["vision_embed_dim"]
    text = dict(
        model_type="qwen2", vocab_size=sizes["vocab_size"], hidden_size=hidden, intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_layers"], num_attention_heads=heads,
        num_key_value_heads=sizes.get("num_kv_heads") or max(1, heads // 2), max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False,
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )  # fmt: skip
    vision = dict(
        model_type="siglip_vision_model", hidden_size=vision_dim, intermediate_size=4 * vision_dim,
        num_hidden_layers=sizes["vision_depth"], num_attention_heads=sizes.get("vision_num_heads") or max(1, vision_dim // 16),
        image_size=image_size, patch_size=patch_size, vision_use_head=False,
    )  # fmt: skip
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_index=ids("<image>"), video_token_index=ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=[[image_size, image_size]],
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
    )  # fmt: skip


def build_tiny(role: str, tokenizer, **overrides) -> Backbone:
    """A randomly initialised tiny LLaVA-OneVision (deterministic given ``seed``), built offline.

    Same defaults and overrides as :func:`vlsi_ray.models.qwen2_vl.build_tiny` (``vision_*`` size the
    SigLIP tower), plus ``patch_size`` (default 28).
    """
    patch_size = overrides.pop("patch_size", None) or PATCH_SIZE
    sizes = resolve_sizes(role, tokenizer, overrides)
    gain = sizes.pop("init_gain")
    config = tiny_config(tokenizer, patch_size=patch_size, **sizes)
    image_processor = build_image_processor(sizes["image_size"], patch_size=patch_size)
    return instantiate_tiny(FAMILY, _model_class(), config, tokenizer, image_processor, role, sizes["seed"], gain)


SPEC = FamilySpec(
    name=FAMILY,
    model_type="llava_onevision",
    model_class=_model_class,
    image_processor_class=_image_processor_class,
    special_tokens=SPECIAL_TOKENS,
    pad_token="<|endoftext|>",
    eos_token="<|im_end|>",
    image_token="<image>",
    chat_template=CHAT_TEMPLATE,
    model_input_names=("input_ids", "attention_mask", "pixel_values", "image_sizes"),
    group_prefixes=(
        ("model.vision_tower.", "vision"),
        ("model.multi_modal_projector.", "projector"),
        ("model.image_newline", "projector"),
        ("model.language_model.embed_tokens.", "embeddings"),
        ("model.language_model.", "language"),
        ("lm_head.", "head"),
    ),
    build_image_processor=build_image_processor,
    process_image=process_image,
    count_image_tokens=count_image_tokens,
    batch_vision=batch_vision,
    uses_mm_token_type_ids=False,
    prepare_loaded=prepare_loaded,
)
