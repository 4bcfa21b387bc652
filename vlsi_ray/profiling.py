"""Measure what :mod:`vlsi_ray.scale` predicts, on tiny models: matmul FLOPs and peak tensor bytes.

:class:`MatmulFlops` counts FLOPs with :mod:`torch.utils.flop_counter`'s formulas (its registry of
matmul, convolution and attention ops) but without its module tracker, whose hooks fail on a
forward run under ``no_grad`` with inputs that require grad (the candidate KLs of step 2).
:class:`PeakTensorBytes` follows every tensor storage an op allocates until it is freed, on any
device, and records the peak; storages that exist before it starts (weights, the batch) are not
counted, nor are views and in-place results of them.
:func:`check_cost_model` runs both on tiny Qwen2-VL models through the objectives the training
loop runs, beside the cost model's prediction.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from vlsi_ray import scale
from vlsi_ray.method.matching import MatchingOptions
from vlsi_ray.method.steps import SFT_GROUPS, InteractionObjective, SFTObjective, VerbalizationObjective, response_positions
from vlsi_ray.models.qwen2_vl import build_tiny
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.signals.produce import teacher_signal
from vlsi_ray.signals.teacher_signal import TeacherSignal


class _OpCounts(TorchDispatchMode):
    """A dispatch mode that tallies something per op in ``counts``; ``total`` sums them."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    @property
    def total(self) -> int:
        """All counted."""
        return sum(self.counts.values())


class MatmulFlops(_OpCounts):
    """FLOPs of the ops run inside the mode, by op, in :mod:`torch.utils.flop_counter`'s convention."""

    def __init__(self):
        super().__init__()
        self.registry = FlopCounterMode(display=False).flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.counts[str(func._overloadpacket)] += formula(*args, **kwargs, out_val=out)
        return out


class HostWaits(_OpCounts):
    """Ops run inside the mode that, on a GPU, make the host wait for the device: reading a value
    (``.item()``, ``float()``, ``bool()``) and data-dependent shapes (``nonzero``, boolean-mask indexing,
    ``masked_select``). Counted on any device, so a CPU test sees where a GPU step would stall; whole-tensor
    transfers (``.cpu()``, ``.tolist()``, copies from pageable host memory) are not ops on a CPU and are not
    counted (one wait each on a GPU). ``counts``: by op."""

    READS = {"_local_scalar_dense", "nonzero", "masked_select"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if name in self.READS:
            self.counts[name] += 1
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1])
        ):
            self.counts[f"{name} (boolean mask)"] += 1
        return func(*args, **kwargs)


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the mode and still alive (views and in-place
    results counted once; ``peak`` after the ``with`` block)."""

    def __init__(self):
        super().__init__()
        self._alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for key in [key for key, (ref, _) in self._alive.items() if ref.expired()]:
            self.live -= self._alive.pop(key)[1]
        # an output on an input's storage (a view, an in-place result) allocated nothing
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                key = _storage_key(tensor)
                if key and key not in self._alive and key not in inputs:
                    storage = tensor.untyped_storage()
                    self._alive[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else 0


def _text_batch(tokens: int, response: int, vocab: int, seed: int = 0) -> dict:
    """One text-only row of ``tokens`` tokens whose last ``response`` positions carry the loss."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (1, tokens), generator=generator)
    labels = ids.clone()
    labels[:, : tokens - response] = -100
    ones = torch.ones(1, tokens, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": ones, "mm_token_type_ids": torch.zeros_like(ones), "labels": labels}


def check_cost_model(tokenizer, image_batch: dict, *, lora_rank: int = 4, memory_sizes: dict | None = None) -> list[dict]:
    """Measured against predicted FLOPs and peak bytes of every step's objective on tiny Qwen2-VL models.

    ``image_batch``: one collated row with an image (:class:`~vlsi_ray.data.collate.ChatCollator`).
    FLOPs: the teacher's signal and step 1 on a teacher, steps 2 and 3 with gradient checkpointing
    off and on on a student (eager attention, so that the attention matmuls are counted). Memory:
    steps 2 and 3, off and on, on a text-only row at ``memory_sizes`` (``hidden``, ``layers``,
    ``intermediate``, ``tokens``, ``response``, ``vocab``: default 256, 6, 512, 1,024, 512, 8,192, so
    that both the blocks' activations and the heads' ``[chunk, V]`` tensors weigh). Returns one dict
    per check: ``what``, ``measured``, ``predicted``.
    """

    teacher = build_tiny("teacher", tokenizer, hidden_size=64, num_layers=4, intermediate_size=128, vision_depth=1)
    student = build_tiny("student", tokenizer, hidden_size=32, num_layers=3, intermediate_size=64, vision_depth=1)
    for model in (teacher, student):
        model.model.set_attn_implementation("eager")
    t_shape = scale.ModelShape.from_hf_config(teacher.model.config.to_dict(), "teacher")
    s_shape = scale.ModelShape.from_hf_config(student.model.config.to_dict(), "student")
    mask, _ = response_positions(image_batch["labels"])
    work = scale.Workload(
        tokens=image_batch["input_ids"].shape[1],
        response=int(mask.sum()),
        image_tokens=int((image_batch["input_ids"] == student.image_token_id).sum()),
        images=len(image_batch["image_grid_thw"]),
    )
    t_verbs = Verbalizers(t_shape.text.hidden, [1, 2, 3])
    signal = teacher_signal(teacher, t_verbs, image_batch, topk=8)
    rows = []

    def flops(what: str, predicted: dict, objective=None) -> None:
        """Count one forward (+ backward of ``objective``'s loss; the teacher's signal when None)."""
        with MatmulFlops() as counter:
            if objective is None:
                teacher_signal(teacher, t_verbs, image_batch, topk=8)
            else:
                objective(image_batch).loss.backward()
        rows.append({"what": f"FLOPs, {what}", "measured": counter.total, "predicted": sum(predicted.values())})

    flops("teacher signal", scale.teacher_signal_flops(t_shape, work, scale.StepSettings(targets=3)))
    step1 = VerbalizationObjective(teacher, t_verbs, chunk_size=1)
    flops("step 1", scale.verbalize_flops(t_shape, work, scale.StepSettings(targets=3)), step1)
    for checkpointing in (False, True):
        label = "with" if checkpointing else "without"
        step2 = InteractionObjective(
            _training_copy(student, checkpointing, lora_rank),
            Verbalizers(s_shape.text.hidden, [1, 2]),
            lambda batch: signal,
            MatchingOptions(),
            generator=torch.Generator().manual_seed(0),
        )
        settings = scale.StepSettings(targets=2, lora_rank=lora_rank, checkpointing=checkpointing)
        flops(f"step 2, {label} checkpointing", scale.interact_flops(s_shape, work, settings), step2)
        step3 = SFTObjective(_training_copy(student, checkpointing, 0), SFT_GROUPS, chunk_size=1)
        settings = scale.StepSettings(checkpointing=checkpointing)
        flops(f"step 3, {label} checkpointing", scale.sft_flops(s_shape, work, settings), step3)
    rows += _memory_checks(tokenizer, lora_rank, memory_sizes or {})
    return rows


def _training_copy(backbone, checkpointing: bool, lora_rank: int):
    """A copy of ``backbone`` in train mode, with checkpointing set and LoRA of ``lora_rank`` (0: none)."""
    copied = copy.deepcopy(backbone)
    copied.set_gradient_checkpointing(checkpointing)
    copied.model.train()
    if lora_rank:
        copied.apply_lora(lora_rank, lora_rank)
    return copied


def _memory_checks(tokenizer, lora_rank: int, sizes: dict) -> list[dict]:
    """Peak bytes of two AdamW steps of steps 2 and 3 (checkpointing off, on) against the prediction."""

    d, layers, mlp = sizes.get("hidden", 256), sizes.get("layers", 6), sizes.get("intermediate", 512)
    tokens, response, vocab = sizes.get("tokens", 1024), sizes.get("response", 512), sizes.get("vocab", 8192)
    student = build_tiny(
        "student", tokenizer, hidden_size=d, num_layers=layers, intermediate_size=mlp, vision_depth=1, vocab_size=vocab
    )
    shape = scale.ModelShape.from_hf_config(student.model.config.to_dict(), "student")
    batch = _text_batch(tokens, response, len(tokenizer))  # ids the tokenizer knows; the heads span the whole vocabulary
    # a teacher signal over the student's whole vocabulary: 3 target layers + the last, top-16
    signal = TeacherSignal.from_logits(torch.randn(4, response, vocab, generator=torch.Generator().manual_seed(0)), 16)
    work = scale.Workload(tokens=tokens, response=response, image_tokens=0)
    rows = []
    for step in ("step 2", "step 3"):
        for checkpointing in (False, True):
            backbone = _training_copy(student, checkpointing, lora_rank if step == "step 2" else 0)
            if step == "step 2":
                verbs = Verbalizers(d, [1, 2, 3])
                objective = InteractionObjective(
                    backbone, verbs, lambda b: signal, MatchingOptions(), generator=torch.Generator().manual_seed(0)
                )
                acts = scale.activation_bytes(shape, work, checkpointing=checkpointing, rank=lora_rank, heads=4, compute_bytes=4)
            else:
                objective = SFTObjective(backbone, SFT_GROUPS)
                acts = scale.activation_bytes(shape, work, checkpointing=checkpointing, full=True, loss="ce", compute_bytes=4)
            optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
            trained = sum(p.numel() for p in objective.parameters())
            with PeakTensorBytes() as meter:
                for _ in range(2):  # the second step runs with AdamW's moments allocated
                    objective(batch).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
            parts = scale.training_peak_bytes(trained, acts, compute_bytes=4)
            parts.pop("trained weights")  # float32 masters are the weights, allocated before the step
            label = "with" if checkpointing else "without"
            rows.append(
                {"what": f"peak bytes, {step}, {label} checkpointing", "measured": meter.peak, "predicted": sum(parts.values())}
            )
    return rows
