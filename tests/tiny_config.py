"""The tiny run every integration test uses: small models, 300 training rows, a few steps per stage."""

from __future__ import annotations

from pathlib import Path

TINY_TEACHER = dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128, vision_embed_dim=32, vision_depth=1, seed=1)
TINY_STUDENT = dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, vision_embed_dim=32, vision_depth=1, seed=2)
TINY_STAGE = dict(lr=1e-3, min_lr=3e-4, batch_size=8, grad_accum=1, log_every=20)
#: Optimizer steps per stage: the teacher gets more, so that the student has something to learn from it.
TINY_STEPS = dict(pretrain_teacher=80, pretrain_student=80, verbalize=60, interact=40, sft=40)


def make_tiny_overrides(tmp: Path, name: str, steps: dict | None = None) -> list[str]:
    """Tiny data and models under ``tmp``, a few steps per stage (t_l = 3, t_s = 2)."""
    out = [
        f"name={name}",
        f"output_dir={tmp / 'runs'}",
        f"data.dir={tmp / 'data'}",
        "data.synthetic.train=300",
        "data.synthetic.val=20",
        "data.synthetic.test=100",
        "model_cache_dir=null",
        "device=cpu",
        "eval_batch_size=50",
        "lora.rank=8",
        "lora.alpha=8",
        "signal.topk=16",
        # Deterministic pairs: with the default multinomial matching the logged loss jumps by ~1 nat
        # between samples of the matched teacher layers, which hides the fall over 40 steps.
        "matching.strategy=uniform",
        "ray.logger=none",  # wandb is exercised once, by the ray job submit test
    ]
    out += [f"teacher.tiny.{k}={v}" for k, v in TINY_TEACHER.items()]
    out += [f"student.tiny.{k}={v}" for k, v in TINY_STUDENT.items()]
    for stage, n in (steps or TINY_STEPS).items():
        out += [f"stages.{stage}.{k}={v}" for k, v in TINY_STAGE.items()] + [f"stages.{stage}.max_steps={n}"]
    return out
