"""The teacher's side of step 2: its verbalized distributions for a batch, as a :class:`TeacherSignal`.

:func:`teacher_signal` is the one place the signal is produced: the in-process runner, the Ray
teacher actors (:class:`vlsi_ray.runners.ray.teacher_pool.TeacherWorker`) and the teacher cache all call it,
so they send the same signal (tail samples included) for the same row.
"""

from __future__ import annotations

import itertools

import torch

from vlsi_ray.method.steps import at_index, model_inputs, response_index, response_token_counts
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

    Layer by layer: each head's ``[N, V]`` logits are reduced to the layer's top-k (+ tail, + draws)
    before the next head runs, so a top-k signal's peak memory is one layer's logits (and
    :meth:`TeacherSignal.from_logits`'s two buffers of that size), whatever the number of target layers.
    """
    if tail_samples and "ids" not in batch:
        raise KeyError(
            "teacher_signal with tail_samples needs the batch's row 'ids' to seed the draw; collate it with ChatCollator."
        )
    vocab = vocab_size or teacher.vocab_size
    out = teacher.forward(model_inputs(batch), logits=False)
    index, _ = response_index(batch["labels"])
    device = teacher.lm_head.weight.device
    heads = [(layer, verbalizers.head(layer, teacher.final_norm, teacher.lm_head)) for layer in verbalizers.layers]
    heads.append((-1, teacher.lm_head))
    rows = None
    if tail_samples:  # each row's draws come from its own generator (layer after layer): the same in any batch
        ends = list(itertools.accumulate(response_token_counts(batch["labels"])))  # row ends among the N response tokens
        rows = [
            (tail_sample_generator(seed, [row_id], device), start, end)
            for row_id, start, end in zip(batch["ids"], [0] + ends[:-1], ends)
        ]
    layers = []
    for layer, head in heads:
        with teacher.autocast():
            logits = head(at_index(out.hidden_states[layer], index, device))[..., :vocab].float()[None]  # [1, N, V]
        if rows is None:
            layers.append(TeacherSignal.from_logits(logits, topk, temperature))
        else:
            layers.append(
                TeacherSignal.cat_tokens(
                    [TeacherSignal.from_logits(logits[:, a:b], topk, temperature, tail_samples, g) for g, a, b in rows]
                )
            )
        del logits
    return TeacherSignal.stack(layers)
