"""Mixed precision, the standard recipe: low-precision compute, float32 master weights and losses.

- A model's **compute dtype** (``teacher.dtype`` / ``student.dtype``: ``auto``, ``bfloat16``,
  ``float16``, ``float32``) is the dtype its weights are loaded in. ``auto`` is bfloat16 on CUDA and
  the checkpoint's own dtype elsewhere (float32 for the tiny models built in memory).
- Frozen weights (the teacher, the student's frozen parts, the LM heads) stay in the compute dtype.
- Trainable weights (verb-FFNs, LoRA adapters, the fine-tuned LLM in step 3) are float32 master
  weights (:func:`keep_float32_masters`); the forward runs under :func:`autocast`, so matmuls use the
  compute dtype while AdamW updates float32 tensors. With DeepSpeed the engine's ``bf16``/``fp16``
  block does the same (its optimizer holds the float32 masters); float16 adds loss scaling.
- Log-softmax, KL and cross-entropy always run in float32 (:mod:`vlsi_ray.method.losses`).
- A stage's checkpoint is written from the float32 masters, cast to the base checkpoint's dtype
  unless asked otherwise; a model used in process after its stage (its evaluation) is then rounded
  to its compute dtype (:func:`round_to_dtype`).

ref: Micikevicius et al., "Mixed Precision Training", ICLR 2018; torch.amp.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

#: ``*.dtype`` config values -> torch dtypes (``auto`` is resolved by :func:`compute_dtype`).
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of config values and ``config.json``)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from its config spelling (``"bfloat16"``, ``"bf16"``, ``"float32"`` ...), or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(value, value)
    if name not in DTYPES:
        raise ValueError(f"dtype {value!r} is not one of {', '.join(DTYPES)}; pick one of those.")
    return DTYPES[name]


def compute_dtype(setting: str | torch.dtype | None, device: torch.device | str, saved: torch.dtype | None) -> torch.dtype:
    """The dtype a model computes in: ``setting`` unless ``auto``/None; then bfloat16 on CUDA
    (float16 where the GPU has no bfloat16) and the checkpoint's ``saved`` dtype elsewhere
    (float32 when unknown)."""
    if setting not in (None, "auto"):
        return parse_dtype(setting)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return saved if saved in DTYPES.values() else torch.float32


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context for float32."""
    if dtype not in LOW_PRECISION:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def keep_float32_masters(parameters: Iterable[nn.Parameter]) -> int:
    """Cast every low-precision parameter among ``parameters`` to float32 in place (its master
    weight); returns how many were cast. Autocast still computes with them in the compute dtype."""
    cast = 0
    for p in parameters:
        if p.dtype in LOW_PRECISION:
            p.data = p.data.float()
            cast += 1
    return cast


def round_to_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter of ``module`` to ``dtype`` in place (float32 masters -> compute
    dtype after training); buffers keep their dtype, as DeepSpeed keeps rotary ``inv_freq``."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
