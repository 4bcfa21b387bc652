"""The family registry: every backbone family VLsI distils within, one :class:`FamilySpec` each.

A family is one module (``qwen2_vl.py``, ``qwen2_5_vl.py``, ``llava_onevision.py``) that defines a
``SPEC``; registering it is one line in :data:`FAMILIES`. Everything family-specific lives in the
spec: the transformers classes, special tokens and chat template, how an image becomes placeholder
tokens, the image-resolution knobs, the tiny offline builder, and how released checkpoints name
their weights and config keys (the Hub layout test fixtures write those). Config validation, the
checkpoint loader, the collator and the tiny-model builder all read this registry.

Importing this module is cheap (no torch, no transformers): family modules load on first use.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: family name -> module that defines its ``SPEC``. Adding a family: one module, one line here.
FAMILIES: dict[str, str] = {
    "qwen2_vl": "vlsi_ray.models.qwen2_vl",
    "qwen2_5_vl": "vlsi_ray.models.qwen2_5_vl",
    "llava_onevision": "vlsi_ray.models.llava_onevision",
}

#: Small file the project writes next to the weights naming the family (config.json's model_type also works).
BACKBONE_FILE = "vlsi_backbone.json"


class UnsupportedModelError(ValueError):
    """A directory does not hold a model of a supported family."""


@dataclass(frozen=True)
class HubLayout:
    """How the family's released checkpoints (transformers 4.x era, as on the Hub) store what
    transformers 5 loads (:mod:`vlsi_ray.models.hub_layout` writes such directories).

    ``config(model config, dtype name)``: the ``config.json`` a release ships (architecture name,
    flat or nested text keys, ``torch_dtype``); ``weight_name``: a transformers-5 parameter name ->
    its name in the released shards (transformers renames it back on load); ``preprocessor``:
    image processor -> ``preprocessor_config.json``; ``generation_config``: tokenizer ->
    ``generation_config.json``; ``extra_files``: image processor -> further ``{file: dict}``
    (LLaVA-OneVision's ``processor_config.json``); ``chat_template_in_tokenizer_config``: whether the
    release also puts the template in ``tokenizer_config.json`` (every one ships ``chat_template.json``).
    """

    config: Callable[[Any, str], dict]
    weight_name: Callable[[str], str]
    preprocessor: Callable[[Any], dict]
    generation_config: Callable[[Any], dict]
    extra_files: Callable[[Any], dict[str, dict]] = lambda image_processor: {}
    chat_template_in_tokenizer_config: bool = True


@dataclass(frozen=True)
class FamilySpec:
    """Everything family-specific the backbone, tokenizer, collator and fixtures need."""

    name: str
    model_type: str  # config.json "model_type"
    model_class: Callable[[], type]  # returns the transformers class (imported on use)
    image_processor_class: Callable[[], type]
    special_tokens: tuple[str, ...]  # in the real family's id order
    pad_token: str
    eos_token: str  # end of an assistant turn
    image_token: str  # the placeholder the chat template emits once per image
    chat_template: str  # as released by the family's instruct checkpoints
    model_input_names: tuple[str, ...]  # batch keys forwarded to the model
    group_prefixes: tuple[tuple[str, str], ...]  # (parameter-name prefix, group); first match wins
    build_image_processor: Callable[..., Any]
    process_image: Callable[[Any, Any], dict]  # (processor, PIL image) -> per-image tensors
    count_image_tokens: Callable[[Any, dict], int]  # placeholder tokens for one image
    batch_vision: Callable[[list[dict]], dict]
    uses_mm_token_type_ids: bool
    build_tiny: Callable[..., Any]  # (role, tokenizer, **sizes) -> Backbone, built offline
    #: image-processor attributes that decide how many tokens an image becomes (compared across a pair)
    resolution_fields: tuple[str, ...]
    #: (image processor, min_pixels, max_pixels) -> None: apply the ``images.*`` settings in place
    set_resolution: Callable[[Any, int | None, int | None], None]
    hub: HubLayout
    has_min_pixels: bool = True  # whether ``images.min_pixels`` means something for this family
    prepare_loaded: Callable[[Any, Any], None] | None = None  # (model config, image processor) after loading


def get_family(name: str) -> FamilySpec:
    """The :class:`FamilySpec` registered as ``name`` (see :data:`FAMILIES`)."""
    if name not in FAMILIES:
        raise UnsupportedModelError(f"family {name!r} is not supported; use one of {', '.join(FAMILIES)}.")
    return importlib.import_module(FAMILIES[name]).SPEC


def detect_family(path: str | Path) -> str:
    """Family of a checkpoint directory, from ``vlsi_backbone.json`` or ``config.json``'s ``model_type`` (no weights read)."""
    path = Path(path)
    marker, config = path / BACKBONE_FILE, path / "config.json"
    if marker.is_file():
        return json.loads(marker.read_text())["family"]
    if not config.is_file():
        raise UnsupportedModelError(
            f"{path} has no config.json, so it is not a transformers model; point to a saved checkpoint directory."
        )
    model_type = json.loads(config.read_text()).get("model_type")
    for name in FAMILIES:
        if get_family(name).model_type == model_type:
            return name
    raise UnsupportedModelError(f"{path} holds a {model_type!r} model, which is not supported; use one of {', '.join(FAMILIES)}.")
