"""Step-2 throughput: in-process sequential teacher+student vs the Ray teacher-actor pipeline.

    python bench/pipeline.py                 # conf/tiny.yaml sizes, 40 steps, batch 16
    python bench/pipeline.py --steps 80 --lookahead 2

Both variants run the same objective (:class:`InteractionObjective`) on the same batches with one
torch thread per process: (a) the teacher forward then the student step in this process; (b) the
teacher in a Ray actor (its own core), the student here, requests pipelined ``lookahead`` batches
ahead. Prints T_teacher and T_student (s/step, measured alone), samples/s of both variants, the
ratio b/a and the ideal ratio (T_t + T_s) / max(T_t, T_s). Goal: b/a >= 0.9 × ideal.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

import torch  # noqa: E402

from vlsi_ray.config import load_config  # noqa: E402
from vlsi_ray.data.synthetic import corpus_texts, generate_rows  # noqa: E402
from vlsi_ray.method.loop import Stepper  # noqa: E402
from vlsi_ray.method.steps import InteractionObjective, teacher_signal  # noqa: E402
from vlsi_ray.models.tokenizer import train_tokenizer  # noqa: E402
from vlsi_ray.prepare import build_model, make_collator, new_verbalizers  # noqa: E402


def student_loop(objective, stepper, batches) -> float:
    """Seconds for one optimizer step per batch (the objective asks its teacher for each batch)."""
    started = time.perf_counter()
    for batch in batches:
        out = objective(batch)
        stepper.backward(out.loss, 1)
        stepper.step()
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lookahead", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, [])
    rows = generate_rows("train", args.batch_size * (args.steps + 5), seed=0)
    tokenizer = train_tokenizer(corpus_texts(rows), cfg.student.family)
    teacher = build_model(cfg.teacher, "teacher", tokenizer, torch.device("cpu"))
    student = build_model(cfg.student, "student", tokenizer, torch.device("cpu"))
    t_verbs, s_verbs = new_verbalizers(cfg, "teacher", teacher, 3), new_verbalizers(cfg, "student", student, 4)
    collate = make_collator(student, cfg)
    batches = [collate(rows[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(args.steps + 5)]
    warm, timed = batches[:5], batches[5:]
    student.apply_lora(cfg.lora.rank, cfg.lora.alpha)

    def local_teacher(batch):
        return teacher_signal(teacher, t_verbs, batch, cfg.signal.topk, cfg.loss.kd_temperature,
                              tail_samples=cfg.signal.tail_samples, seed=cfg.seed)

    def make_objective(teacher_fn):
        objective = InteractionObjective(student, s_verbs, teacher_fn, cfg.matching, torch.Generator().manual_seed(0))
        return objective, Stepper(objective.parameters(), cfg.stages.interact)

    # T_teacher and T_student alone (the student against precomputed signals).
    for b in warm:
        local_teacher(b)
    started = time.perf_counter()
    signals = {tuple(b["ids"]): local_teacher(b) for b in timed}
    t_teacher = (time.perf_counter() - started) / len(timed)
    objective, stepper = make_objective(lambda b: signals[tuple(b["ids"])])
    student_loop(objective, stepper, timed[:2])  # warm-up
    t_student = student_loop(objective, stepper, timed) / len(timed)

    # (a) sequential, in this process.
    objective, stepper = make_objective(local_teacher)
    a = len(timed) * args.batch_size / student_loop(objective, stepper, timed)

    # (b) the Ray pipeline: one teacher actor on its own core, requests lookahead batches ahead.
    import ray

    from vlsi_ray.actors.client import TeacherClient
    from vlsi_ray.actors.teacher import TeacherPool
    from vlsi_ray.ray_runner import ray_env

    ray.init(address="local", num_cpus=2, runtime_env={"env_vars": ray_env()}, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        teacher.save_pretrained(Path(tmp) / "teacher")
        t_verbs.save(Path(tmp) / "verbs")
        pool = TeacherPool(cfg.teacher_pool, Path(tmp) / "teacher", Path(tmp) / "verbs", cfg.signal.topk,
                           cfg.loss.kd_temperature, None, cfg.signal.storage, tail_samples=cfg.signal.tail_samples, seed=cfg.seed)
        client = TeacherClient(pool.actors, args.lookahead)
        objective, stepper = make_objective(client)
        student_loop(objective, stepper, client.pipelined(iter(warm)))
        waited = client.wait_seconds
        b = len(timed) * args.batch_size / student_loop(objective, stepper, client.pipelined(iter(timed)))
        wait_per_step = (client.wait_seconds - waited) / len(timed)
        pool.shutdown()
    ray.shutdown()

    ideal = (t_teacher + t_student) / max(t_teacher, t_student)
    print(f"T_teacher {t_teacher:.3f} s/step   T_student {t_student:.3f} s/step   (batch {args.batch_size}, 1 thread each)")
    print(f"(a) in-process sequential: {a:.1f} samples/s")
    print(f"(b) Ray actor pipeline:    {b:.1f} samples/s   student waits {wait_per_step * 1000:.0f} ms/step on the teacher")
    print(f"ratio b/a {b / a:.2f}   ideal {ideal:.2f}   b/a / ideal {b / a / ideal:.2f} (goal >= 0.90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
