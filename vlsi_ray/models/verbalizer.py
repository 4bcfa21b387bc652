"""Verbalizers: per-layer heads that turn an intermediate hidden state into a next-token distribution.

verbalizer_l(h) = LMHead(FinalNorm(h + verb_FFN_l(h)))  (project default; see VLSI_METHOD.md)

The verb-FFN is the paper's gated d×d FFN, ``down(SiLU(gate(h)) * up(h))`` with no expansion, so a
set of n verbalizers on a width-d model has exactly 3·d²·n parameters. With ``residual=True`` and
``zero_init=True`` the down projection starts at zero and the verbalizer equals the logit lens of its
layer at step 0. The LM head and final norm belong to the backbone and stay frozen; only verb-FFNs
are stored here, and they are saved and loaded separately from the backbone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_FILE = "verbalizers.json"
WEIGHTS_FILE = "verbalizers.safetensors"


class VerbFFN(nn.Module):
    """Gated d×d FFN ``down(SiLU(gate(h)) * up(h))``, optionally residual."""

    def __init__(self, hidden_size: int, residual: bool = True, zero_init: bool = True):
        super().__init__()
        self.residual = residual
        self.gate = nn.Linear(hidden_size, hidden_size, bias=False)
        self.up = nn.Linear(hidden_size, hidden_size, bias=False)
        self.down = nn.Linear(hidden_size, hidden_size, bias=False)
        if zero_init:
            nn.init.zeros_(self.down.weight)

    def forward(self, h: Tensor) -> Tensor:
        """``h [..., d] -> [..., d]``."""
        y = self.down(nn.functional.silu(self.gate(h)) * self.up(h))
        return h + y if self.residual else y


class Verbalizers(nn.Module):
    """The verb-FFNs of one model, keyed by 1-based target layer."""

    def __init__(
        self,
        hidden_size: int,
        layers: Sequence[int],
        residual: bool = True,
        zero_init: bool = True,
        final_norm: bool = True,
    ):
        super().__init__()
        if not layers:
            raise ValueError("Verbalizers needs at least one target layer; set targets in the model config.")
        self.hidden_size = hidden_size
        self.layers = [int(layer) for layer in layers]
        self.residual = residual
        self.zero_init = zero_init
        self.use_final_norm = final_norm
        self.ffns = nn.ModuleDict({str(layer): VerbFFN(hidden_size, residual, zero_init) for layer in self.layers})

    def head(self, layer: int, final_norm: nn.Module, lm_head: nn.Module) -> Callable[[Tensor], Tensor]:
        """The full verbalizer of ``layer`` as a function ``h [n, d] -> logits [n, V]``."""
        ffn = self.ffns[str(layer)]
        if self.use_final_norm:
            return lambda h: lm_head(final_norm(ffn(h)))
        return lambda h: lm_head(ffn(h))

    def shard(self, mesh) -> Verbalizers:
        """Split every verb-FFN over the ranks of ``mesh`` (a 1-D ``DeviceMesh``: a tensor-parallel teacher
        replica), Megatron-style with torch's tensor-parallel plans: ``gate`` and ``up`` column-wise (each rank
        computes ``d / world`` of the inner width), ``down`` row-wise (its partial sums all-reduced), so a rank
        holds ``1 / world`` of each verb-FFN and the input and output ``[n, d]`` stay whole. Every rank
        calls it; returns ``self``."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: PLC0415

        if self.hidden_size % mesh.size():
            raise ValueError(f"verb-FFN width {self.hidden_size} does not split over {mesh.size()} tensor-parallel ranks.")
        plan = {"gate": ColwiseParallel(), "up": ColwiseParallel(), "down": RowwiseParallel()}
        for ffn in self.ffns.values():
            parallelize_module(ffn, mesh, plan)
        return self

    def full_state_dict(self, values: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The state dict with whole tensors on the CPU: sharded ones (:meth:`shard`) gathered from every
        rank, which must all call it. ``values``: this rank's local parts to use instead of the parameters'
        own (an offloaded optimizer's float32 masters, keyed as the state dict)."""
        out = {}
        for name, tensor in self.state_dict().items():
            value = tensor if values is None or name not in values else values[name]
            if hasattr(tensor, "full_tensor"):
                from torch.distributed.tensor import DTensor  # noqa: PLC0415

                if value is not tensor:
                    value = DTensor.from_local(value.to(tensor.device_mesh.device_type), tensor.device_mesh, tensor.placements)
                value = value.full_tensor()
            out[name] = value.detach().contiguous().cpu()
        return out

    def extra_repr(self) -> str:
        return f"layers={self.layers}, residual={self.residual}, final_norm={self.use_final_norm}"

    def save(self, path: str | Path, state: dict[str, Tensor] | None = None) -> None:
        """Write ``verbalizers.json`` and ``verbalizers.safetensors`` into directory ``path``; ``state``: the
        weights to write (:meth:`full_state_dict`; default this module's own, which must be whole)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "hidden_size": self.hidden_size,
            "layers": self.layers,
            "residual": self.residual,
            "zero_init": self.zero_init,
            "final_norm": self.use_final_norm,
        }
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if state is None:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> Verbalizers:
        """Load verbalizers saved by :meth:`save` from directory ``path``."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no {CONFIG_FILE} in {path}; point at a directory written by Verbalizers.save.")
        meta = json.loads((path / CONFIG_FILE).read_text())
        module = cls(meta["hidden_size"], meta["layers"], meta["residual"], meta["zero_init"], meta["final_norm"])
        module.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return module.to(device) if device is not None else module

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether ``path`` holds saved verbalizers."""
        return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()
