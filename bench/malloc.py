"""``ray.tune_malloc``: training steps with the Ray workers' glibc settings vs glibc's defaults, side by side.

    python bench/malloc.py                  # 5 runs of each, alternating; 40 timed steps per run
    python bench/malloc.py --runs 7 --steps 60

Each run is a fresh process (glibc reads its settings at start) that trains the conf/tiny.yaml student
by SFT on the synthetic task, one torch thread, batch 16: 5 warm-up steps, then ``--steps`` timed
ones. A run prints its samples/s, its minor page faults per step (``ru_minflt``) and a hash of the
trained weights. Tuned runs get :data:`vlsi_ray.env.MALLOC_ENV`, default runs no ``MALLOC_*`` variable;
the kinds alternate so that machine noise hits both. Prints per kind the median, min and max of
samples/s and faults per step, the ratio of the medians (tuned / default), and whether every run
trained the same weights (the allocator must not change the numbers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import MALLOC_ENV, set_offline_defaults  # noqa: E402

set_offline_defaults()

WARM_UP = 5
BATCH = 16


def one_run(config: str, steps: int) -> dict:
    """Train the tiny student for ``WARM_UP + steps`` SFT steps in this process; what it measured."""
    import torch  # noqa: PLC0415 - after the allocator settings of this process are fixed

    from vlsi_ray.config import load_config  # noqa: PLC0415 - imports torch
    from vlsi_ray.data.synthetic import corpus_texts, generate_rows  # noqa: PLC0415 - imports torch
    from vlsi_ray.method.loop import Stepper  # noqa: PLC0415 - imports torch
    from vlsi_ray.method.steps import SFTObjective  # noqa: PLC0415 - imports torch
    from vlsi_ray.models.tokenizer import train_tokenizer  # noqa: PLC0415 - imports transformers
    from vlsi_ray.prepare import build_model, make_collator  # noqa: PLC0415 - imports torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(config, [])
    rows = generate_rows("train", BATCH * (WARM_UP + steps), seed=0)
    student = build_model(cfg, "student", train_tokenizer(corpus_texts(rows), cfg.student.family), torch.device("cpu"))
    collate = make_collator(student, cfg)
    batches = [collate(rows[i * BATCH : (i + 1) * BATCH]) for i in range(WARM_UP + steps)]
    objective = SFTObjective(student)
    stepper = Stepper(objective.parameters(), cfg.stages.sft)

    def train(part: list[dict]) -> None:
        for batch in part:
            stepper.backward(objective(batch).loss, 1)
            stepper.step()

    train(batches[:WARM_UP])
    faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    train(batches[WARM_UP:])
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for _, p in sorted(student.model.named_parameters()):
        digest.update(p.detach().float().numpy().tobytes())
    return {
        "samples_per_s": steps * BATCH / seconds,
        "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps,
        "weights": digest.hexdigest()[:16],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "tiny.yaml"))
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind, alternating")
    parser.add_argument("--steps", type=int, default=40, help="timed SFT steps per run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_run(args.config, args.steps)), flush=True)
        return 0

    plain = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    envs = {"tuned": {**plain, **MALLOC_ENV}, "default": plain}
    results: dict[str, list[dict]] = {kind: [] for kind in envs}
    for run in range(args.runs):
        for kind, env in envs.items():
            command = [sys.executable, __file__, "--child", "--config", args.config, "--steps", str(args.steps)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[kind][-1]
            print(
                f"run {run + 1} {kind:>7}: {r['samples_per_s']:.1f} samples/s, {r['faults_per_step']:.0f} page faults/step",
                flush=True,
            )

    medians = {}
    for kind, runs in results.items():
        rates, faults = [r["samples_per_s"] for r in runs], [r["faults_per_step"] for r in runs]
        medians[kind] = statistics.median(rates)
        print(f"{kind:>7}: samples/s median {medians[kind]:.1f} (min {min(rates):.1f}, max {max(rates):.1f}); "
              f"page faults/step median {statistics.median(faults):.0f} (min {min(faults):.0f}, max {max(faults):.0f})")  # fmt: skip
    weights = {r["weights"] for runs in results.values() for r in runs}
    print(f"tuned / default samples/s (medians of {args.runs} runs each): {medians['tuned'] / medians['default']:.2f}; "
          f"trained weights {'identical in every run' if len(weights) == 1 else 'DIFFER: ' + ', '.join(sorted(weights))}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
