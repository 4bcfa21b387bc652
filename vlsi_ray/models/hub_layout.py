"""Write a model the way its family's released checkpoints are laid out on the Hub.

Released Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision checkpoints were written by transformers 4.x:
bfloat16 safetensors in shards with a ``model.safetensors.index.json``, weight names and
``config.json`` keys of the 4.x classes (flat Qwen2 text keys, ``torch_dtype``, ``rope_scaling``),
``tokenizer.json`` + ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` with the family's
special tokens, the chat template in ``chat_template.json``, ``preprocessor_config.json`` (with
``min_pixels``/``max_pixels`` for Qwen), ``generation_config.json``, and no ``vlsi_backbone.json``.
:func:`write_hub_checkpoint` writes a (tiny) model in exactly that layout, so the tests, the dry run
and a new user can exercise the real loading path offline; what each family's release looks like
is in its :class:`~vlsi_ray.models.families.HubLayout`.

``python jobs/hub_checkpoints.py --out DIR`` writes a tiny teacher/student pair per family.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlsi_ray.models.backbone import Backbone
from vlsi_ray.models.precision import dtype_name

INDEX_FILE = "model.safetensors.index.json"


def write_hub_checkpoint(backbone: Backbone, out: str | Path, dtype: torch.dtype = torch.bfloat16, shards: int = 3) -> Path:
    """Write ``backbone`` into ``out`` in its family's released Hub layout, weights cast to ``dtype``
    and split into about ``shards`` safetensors files.

    Returns ``out``. Loading it back with :meth:`Backbone.from_pretrained` gives the same model
    (weights as cast), by way of transformers' 4.x -> 5 checkpoint conversion.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec, hub = backbone.spec, backbone.spec.hub
    _write_shards(backbone, out, dtype, shards)
    _write_json(out / "config.json", hub.config(backbone.base_model.config, dtype_name(dtype)))
    _write_json(out / "generation_config.json", hub.generation_config(backbone.tokenizer))
    _write_tokenizer(backbone, out)
    _write_json(out / "chat_template.json", {"chat_template": spec.chat_template})
    _write_json(out / "preprocessor_config.json", hub.preprocessor(backbone.image_processor))
    for name, content in hub.extra_files(backbone.image_processor).items():
        _write_json(out / name, content)
    return out


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def _write_shards(backbone: Backbone, out: Path, dtype: torch.dtype, count: int) -> None:
    """``model-0000i-of-0000n.safetensors`` under the released weight names, plus the index."""
    weight_name = backbone.spec.hub.weight_name
    tensors = {
        weight_name(name): t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous().cpu()
        for name, t in backbone.base_model.state_dict().items()
    }
    shard_bytes = -(-sum(t.numel() * t.element_size() for t in tensors.values()) // max(1, count))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _write_tokenizer(backbone: Backbone, out: Path) -> None:
    """``tokenizer.json``, the BPE's ``vocab.json`` + ``merges.txt`` and a released-style ``tokenizer_config.json``."""
    tokenizer, spec = backbone.tokenizer, backbone.spec
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    model = json.loads((out / "tokenizer.json").read_text())["model"]
    _write_json(out / "vocab.json", model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {
        str(token_id): {
            "content": str(token),
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, token in sorted(tokenizer.added_tokens_decoder.items())
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in spec.special_tokens if t not in (spec.pad_token,)],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": spec.eos_token,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": spec.pad_token,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if spec.hub.chat_template_in_tokenizer_config:
        config["chat_template"] = spec.chat_template
    _write_json(out / "tokenizer_config.json", config)
