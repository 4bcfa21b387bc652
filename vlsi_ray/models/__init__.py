"""Backbones VLsI distils between, their tokenizers, and the verbalizer heads.

- ``backbone``: :class:`Backbone` over transformers VLMs, the family registry, compatibility checks.
- ``qwen2_vl`` / ``llava_onevision``: one module per family (spec, image processor, tiny builders).
- ``tokenizer``: offline-trained byte-level BPE with a family's special tokens and chat template.
- ``verbalizer``: per-layer heads (verb-FFN + the backbone's own final norm and LM head).

Importing this package is cheap: transformers and peft load when a model is built or loaded.
"""

from vlsi_ray.models.backbone import (
    FAMILIES,
    Backbone,
    BackboneOutput,
    IncompatibleModelsError,
    ModelInfo,
    UnsupportedModelError,
    build_image_processor,
    check_compatible,
    get_family,
    load_backbone,
)

__all__ = [
    "FAMILIES",
    "Backbone",
    "BackboneOutput",
    "IncompatibleModelsError",
    "ModelInfo",
    "UnsupportedModelError",
    "build_image_processor",
    "check_compatible",
    "get_family",
    "load_backbone",
]
