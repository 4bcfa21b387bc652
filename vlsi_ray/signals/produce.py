"""The teacher's side of step 2: its verbalized distributions for a batch, as a :class:`TeacherSignal`.

:func:`teacher_signal` is the one place the signal is produced: the in-process runner, the Ray
teacher actors (:class:`vlsi_ray.runners.ray.teacher_pool.TeacherWorker`) and the teacher cache all call it,
so they send the same signal (tail samples included) for the same row.
"""

from __future__ import annotations

import torch

from vlsi_ray.method.steps import at_positions, model_inputs, response_positions
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.signals.teacher_signal import TeacherSignal, tail_sample_generator


@torch.no_grad()
def teacher_signal(
    teacher: Backbone,
    verbalizers: Verbalizers,
    batch: dict,
    topk: int | None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    tail_samples: int = 0,
    seed: int = 0,
) -> TeacherSignal:
    """The teacher's verbalized distributions for one batch (step 2's teacher side).

    Returns a signal with ``t_l + 1`` layers over the ``N`` response positions: one per teacher
    target layer (in ``verbalizers.layers`` order) and the final layer last; top-k + tail when
    ``topk`` is set, dense otherwise. ``vocab_size`` restricts logits to the shared vocab prefix.
    ``tail_samples`` (top-k only) adds that many tail samples per token and layer, drawn for each
    row by :func:`tail_sample_generator` from ``seed`` and the row's id, so every caller sends the
    same samples for the same row, in any batch.
    """
    if tail_samples and "ids" not in batch:
        raise KeyError(
            "teacher_signal with tail_samples needs the batch's row 'ids' to seed the draw; collate it with ChatCollator."
        )
    vocab = vocab_size or teacher.vocab_size
    out = teacher.forward(model_inputs(batch), logits=False)
    mask, _ = response_positions(batch["labels"])
    device = teacher.lm_head.weight.device
    layers = []
    with teacher.autocast():
        for layer in verbalizers.layers:
            head = verbalizers.head(layer, teacher.final_norm, teacher.lm_head)
            layers.append(head(at_positions(out.hidden_states[layer], mask, device))[..., :vocab].float())
        layers.append(teacher.lm_head(at_positions(out.hidden_states[-1], mask, device))[..., :vocab].float())
    logits = torch.stack(layers)
    if not tail_samples:
        return TeacherSignal.from_logits(logits, topk, temperature)
    # Each row's samples come from its own generator: the same whatever batch the row is in.
    ends = mask.sum(dim=1).cumsum(0).tolist()  # row ends among the N response tokens
    return TeacherSignal.cat_tokens(
        [
            TeacherSignal.from_logits(
                logits[:, start:end], topk, temperature, tail_samples, tail_sample_generator(seed, [row_id], logits.device)
            )
            for row_id, start, end in zip(batch["ids"], [0] + ends[:-1], ends)
        ]
    )
