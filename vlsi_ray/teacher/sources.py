"""Step 2's teacher: one factory for every way a run gets the teacher's signal.

Whatever the source, step 2 calls ``teacher(batch) -> TeacherSignal`` (``t_l`` target layers + the
final layer over the batch's response tokens); the Ray train loop also calls ``start_at(rank)``,
``pipelined(batches)`` and ``counters()`` on the pooled and cached sources. The sources:

- **in-process** (``runner=local``, the benches): the teacher and its verbalizers in this process,
  :func:`vlsi_ray.signals.produce.teacher_signal` per batch;
- **pool** (the Ray runner's live teacher): a :class:`~vlsi_ray.runners.ray.client.TeacherClient` over
  the teacher actors, requests pipelined ``teacher_pool.lookahead`` batches ahead;
- **cache** (``teacher.source=cache``): the offline signal ``jobs/teacher_cache.py`` wrote,
  checked against this run's spec (:class:`~vlsi_ray.signals.cache.TeacherCache`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from vlsi_ray.recipe.layout import RunLayout
from vlsi_ray.recipe.stages import stage
from vlsi_ray.runners.ray.client import TeacherClient
from vlsi_ray.signals.produce import teacher_signal
from vlsi_ray.signals.teacher_signal import TeacherSignal
from vlsi_ray.teacher.cache import open_cache


def teacher_source(
    cfg,
    layout: RunLayout,
    vocab: int,
    *,
    teacher=None,
    verbalizers=None,
    pool=None,
    ready: Sequence = (),
    teacher_dir: str | Path | None = None,
    student_dir: str | Path | None = None,
) -> Callable[[dict], TeacherSignal]:
    """Step 2's ``batch -> TeacherSignal`` for ``cfg``: the offline cache when ``teacher.source=cache``
    (``teacher_dir``/``student_dir``: the checkpoints the cache must have been built from), else the
    teacher ``pool`` when given (``ready``: calls the client waits for before its first request), else
    the in-process ``teacher`` with its frozen ``verbalizers``. ``vocab``: the shared vocabulary."""
    if cfg.teacher.source == "cache":
        return open_cache(cfg, teacher_dir, student_dir, layout.verbalizers("teacher"), vocab)
    if pool is not None:
        return TeacherClient(pool.actors, cfg.teacher_pool.lookahead, ready=list(ready))
    if teacher is None or verbalizers is None:
        raise ValueError("an in-process teacher source needs the teacher and its verbalizers; pass teacher= and verbalizers=.")
    return in_process(cfg, teacher, verbalizers, vocab)


def in_process(cfg, teacher, verbalizers, vocab: int | None = None) -> Callable[[dict], TeacherSignal]:
    """The teacher and its (frozen) verbalizers in this process as a source, with ``cfg``'s signal settings."""
    seed = stage("interact").seed(cfg.seed)  # tail samples: seeded from step 2's seed and each row's id

    def signal(batch: dict) -> TeacherSignal:
        return teacher_signal(
            teacher,
            verbalizers,
            batch,
            cfg.signal.topk,
            cfg.loss.kd_temperature,
            vocab,
            tail_samples=cfg.signal.tail_samples,
            seed=seed,
        )

    return signal
