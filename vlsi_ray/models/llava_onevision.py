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

from vlsi_ray.models.backbone import Backbone, instantiate_tiny
from vlsi_ray.models.families import FamilySpec, HubLayout
from vlsi_ray.models.qwen2_vl import hub_text_keys, resolve_sizes

FAMILY = "llava_onevision"
#: Qwen2 base tokens then LLaVA-OneVision's added image/video tokens (151643 ... 151647).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
#: llava-hf's LLaVA-OneVision template, as released (chat_template.json of llava-onevision-qwen2-*-hf):
#: ``<|im_start|>user <image>\n{text}<|im_end|>``, ``<|im_start|>assistant \n{text}<|im_end|>``, no newline
#: between turns, and a generation prompt ``<|im_start|>assistant\n`` that is *not* a prefix of the
#: rendered assistant turn (the collator trains on the generation prompt: see vlsi_ray.data.collate).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PATCH_SIZE = 28


def _image_processor_class():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil  # noqa: PLC0415 - transformers loads on use, after the offline defaults

    return LlavaOnevisionImageProcessorPil


def _model_class():
    from transformers import LlavaOnevisionForConditionalGeneration  # noqa: PLC0415 - transformers loads on use, after the offline defaults

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
    from transformers.image_processing_utils import select_best_resolution  # noqa: PLC0415 - transformers loads on use, after the offline defaults

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


RESOLUTION_FIELDS = ("size", "image_grid_pinpoints", "num_image_tokens", "vision_feature_select_strategy")


def set_resolution(image_processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """``images.max_pixels``: keep only the crop grids (``image_grid_pinpoints``) of at most that many
    pixels, which bounds the tokens of any image (the base view's crop size always stays). LLaVA-OneVision
    has no minimum: every image is resized to its best grid, so ``images.min_pixels`` is refused."""
    if min_pixels is not None:
        raise ValueError("images.min_pixels has no llava_onevision equivalent; leave it null and use images.max_pixels.")
    if max_pixels is None:
        return
    crop = image_processor.size["height"] * image_processor.size["width"]
    if max_pixels < crop:
        raise ValueError(
            f"images.max_pixels={max_pixels} is below one {image_processor.size['height']}-px crop ({crop} pixels); "
            f"use at least {crop}."
        )
    kept = [list(p) for p in image_processor.image_grid_pinpoints if p[0] * p[1] <= max_pixels]
    image_processor.image_grid_pinpoints = kept or [[image_processor.size["height"], image_processor.size["width"]]]


def hub_config(config, dtype: str) -> dict:
    """``config.json`` as llava-hf/llava-onevision-qwen2-*-ov-hf ships it (nested Qwen2 text config)."""
    vision = config.vision_config
    text = {
        "_name_or_path": "Qwen/Qwen2-7B-Instruct",
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **hub_text_keys(config.text_config),
        "torch_dtype": dtype,
    }
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
        "ignore_index": -100, "image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
        "image_token_index": config.image_token_id, "video_token_index": config.video_token_id,
        "projector_hidden_act": config.projector_hidden_act, "text_config": text, "tie_word_embeddings": False,
        "torch_dtype": dtype, "transformers_version": "4.45.0.dev0", "use_image_newline_parameter": True,
        "vision_aspect_ratio": config.vision_aspect_ratio,
        "vision_config": {
            "hidden_size": vision.hidden_size, "image_size": vision.image_size, "intermediate_size": vision.intermediate_size,
            "model_type": "siglip_vision_model", "num_attention_heads": vision.num_attention_heads,
            "num_hidden_layers": vision.num_hidden_layers, "patch_size": vision.patch_size, "vision_use_head": False,
        },
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }  # fmt: skip


#: transformers-5 prefix -> the released (LlavaOnevisionForConditionalGeneration 4.x) prefix.
_HUB_PREFIXES = (
    ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),  # 4.x wrapped SigLIP in SiglipVisionModel.vision_model
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)  # fmt: skip


def hub_weight_name(name: str) -> str:
    """A transformers-5 parameter name -> its name in llava-hf's released shards."""
    for new, old in _HUB_PREFIXES:
        if name.startswith(new):
            return old + name.removeprefix(new)
    return name


def hub_preprocessor(image_processor) -> dict:
    """``preprocessor_config.json`` as llava-hf ships it (the per-crop token count is in processor_config.json)."""
    size = {"height": image_processor.size["height"], "width": image_processor.size["width"]}
    return {
        "crop_size": size, "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": [list(p) for p in image_processor.image_grid_pinpoints],
        "image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std),
        "image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": size,
    }  # fmt: skip


def hub_processor_config(image_processor) -> dict[str, dict]:
    """``processor_config.json``: tokens per crop and the feature strategy, read by LlavaOnevisionProcessor."""
    return {
        "processor_config.json": {
            "num_image_tokens": image_processor.num_image_tokens,
            "processor_class": "LlavaOnevisionProcessor",
            "vision_feature_select_strategy": image_processor.vision_feature_select_strategy,
        }
    }


def hub_generation_config(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "transformers_version": "4.45.0.dev0",
    }


def tiny_config(tokenizer, image_size: int = 112, patch_size: int = PATCH_SIZE, **sizes):
    """A ``LlavaOnevisionConfig`` (SigLIP + Qwen2) with the given sizes and the tokenizer's ids."""
    from transformers import LlavaOnevisionConfig  # noqa: PLC0415 - transformers loads on use, after the offline defaults

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
    build_tiny=build_tiny,
    resolution_fields=RESOLUTION_FIELDS,
    set_resolution=set_resolution,
    hub=HubLayout(
        config=hub_config,
        weight_name=hub_weight_name,
        preprocessor=hub_preprocessor,
        generation_config=hub_generation_config,
        extra_files=hub_processor_config,
        chat_template_in_tokenizer_config=False,
    ),
    has_min_pixels=False,
    prepare_loaded=prepare_loaded,
)
