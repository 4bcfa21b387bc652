"""Qwen2.5-VL: the family spec and tiny offline builder (the rest is Qwen2-VL's).

Qwen2.5-VL keeps Qwen2-VL's tokenizer, chat template, image processor (14-px patches merged 2×2,
``min_pixels``/``max_pixels``) and M-RoPE language model; its vision tower differs (RMSNorm,
gated MLPs, window attention with full attention in ``fullatt_block_indexes``, an output width
``out_hidden_size`` equal to the language model's). So an image gives the same number of tokens
as in Qwen2-VL: 112 px -> **16 image tokens** with :func:`qwen2_vl.build_image_processor`.
"""

from __future__ import annotations

from dataclasses import replace

from vlsi_ray.models import qwen2_vl
from vlsi_ray.models.backbone import Backbone, instantiate_tiny
from vlsi_ray.models.families import HubLayout

FAMILY = "qwen2_5_vl"


def _model_class():
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415 - transformers loads on use, after the offline defaults

    return Qwen2_5_VLForConditionalGeneration


def tiny_config(tokenizer, **sizes):
    """A ``Qwen2_5_VLConfig`` with the given sizes (the vision tower's last block attends fully)."""
    from transformers import Qwen2_5_VLConfig  # noqa: PLC0415 - transformers loads on use, after the offline defaults

    width = sizes["vision_embed_dim"]
    vision = dict(
        depth=sizes["vision_depth"], hidden_size=width, intermediate_size=2 * width,
        num_heads=sizes.get("vision_num_heads") or max(1, width // 16), out_hidden_size=sizes["hidden_size"],
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[sizes["vision_depth"] - 1], tokens_per_second=2,
    )  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=qwen2_vl.tiny_text_config(tokenizer, sizes),
        vision_config=vision,
        tie_word_embeddings=False,
        **qwen2_vl.special_token_ids(tokenizer),
    )


def build_tiny(role: str, tokenizer, **overrides) -> Backbone:
    """A randomly initialised tiny Qwen2.5-VL (deterministic given ``seed``), built offline; same
    defaults and overrides as :func:`vlsi_ray.models.qwen2_vl.build_tiny`."""
    sizes = qwen2_vl.resolve_sizes(role, tokenizer, overrides)
    gain = sizes.pop("init_gain")
    config = tiny_config(tokenizer, **sizes)
    image_processor = qwen2_vl.build_image_processor(sizes["image_size"])
    return instantiate_tiny(FAMILY, _model_class(), config, tokenizer, image_processor, role, sizes["seed"], gain)


def hub_config(config, dtype: str) -> dict:
    """``config.json`` as Qwen/Qwen2.5-VL-*-Instruct ships it (flat text keys, window-attention vision tower)."""
    vision = config.vision_config
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        **qwen2_vl.hub_text_and_token_keys(config), "max_position_embeddings": 128000,
        "vision_config": {
            "depth": vision.depth, "hidden_act": vision.hidden_act, "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size, "num_heads": vision.num_heads, "in_chans": 3,
            "out_hidden_size": vision.out_hidden_size, "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size, "spatial_patch_size": vision.patch_size,
            "window_size": vision.window_size, "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "tokens_per_second": vision.tokens_per_second, "temporal_patch_size": vision.temporal_patch_size,
        },
        "torch_dtype": dtype, "transformers_version": "4.49.0",
    }  # fmt: skip


def hub_preprocessor(image_processor) -> dict:
    """Qwen2-VL's ``preprocessor_config.json`` with the Qwen2.5-VL processor class."""
    return {**qwen2_vl.hub_preprocessor(image_processor), "processor_class": "Qwen2_5_VLProcessor"}


SPEC = replace(
    qwen2_vl.SPEC,
    name=FAMILY,
    model_type="qwen2_5_vl",
    model_class=_model_class,
    build_tiny=build_tiny,
    hub=HubLayout(
        config=hub_config,
        weight_name=qwen2_vl.hub_weight_name,
        preprocessor=hub_preprocessor,
        generation_config=qwen2_vl.hub_generation_config,
    ),
)
