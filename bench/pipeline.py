"""Step-2 throughput: in-process sequential teacher+student vs the Ray teacher-actor pipeline.

    python bench/pipeline.py                 # conf/tiny.yaml sizes, batch 16, 7 rounds of 60 steps
    python bench/pipeline.py --rounds 9 --lookahead 2

All three run the same objective (:class:`InteractionObjective`) on the same batches with one
torch thread per process: (a) the teacher forward then the student step in this process; (b) the
teacher in a Ray actor (its own core), the student here, requests pipelined ``lookahead`` batches
ahead; (c) the same two processes both busy at once with nothing to wait for: the actor answers every
batch while the student trains on precomputed signals: what two processes at once reach on this
machine, where they slow each other down (shared caches and memory), which the ideal ratio ignores.
It is a reference for (b), not a bound: the two are within noise of each other. (b1) is (b) with a
replica that takes one request at a time (``teacher_pool.overlap_host_work=false``): (b)'s replica
decodes and copies the next batch, and encodes the last signal, while its forward runs; beside both,
the teacher's busy fraction (the seconds its forwards held the device over the measurement's). Each round measures, one after the other on the same batches, T_teacher and T_student
(s/step, each alone), (a), (b), (b1) and (c), with the Ray actors up throughout (its idle cost is in every
measurement), and scores the round: b/a ÷ the ideal ratio (T_t + T_s) / max(T_t, T_s), perfect
overlap, beside c/a ÷ the ideal ratio. (b) fills its pipeline once
per measurement (its first batch waits for a whole teacher forward), which caps b/a at about
n/(n+1) × ideal for n steps: 0.98 at the default 60, so that the score measures the steady state of
a long stage. The machines are noisy (single measurements vary by ±15%), so the five numbers of a
round are taken close together; the summary's ratios are computed from the medians over ``--rounds``
rounds, the per-round ratios give their spread. Goal: b/a >= 0.9 × ideal. Every process uses the allocator settings of the Ray runner's workers
(``ray.tune_malloc``, :data:`vlsi_ray.env.MALLOC_ENV`); ``--default-malloc`` keeps glibc's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import malloc_env, set_offline_defaults  # noqa: E402

if "--default-malloc" not in sys.argv and malloc_env():
    # glibc reads its settings at process start: run again with those of the Ray runner's workers
    # (ray.tune_malloc), so that (a), (b) and the actor use the same allocator. The actor inherits them.
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **malloc_env()})
set_offline_defaults()

import ray  # noqa: E402
import torch  # noqa: E402

from vlsi_ray.config import load_config  # noqa: E402
from vlsi_ray.data.synthetic import corpus_texts, generate_rows  # noqa: E402
from vlsi_ray.method.loop import Stepper  # noqa: E402
from vlsi_ray.method.steps import InteractionObjective  # noqa: E402
from vlsi_ray.models.tokenizer import train_tokenizer  # noqa: E402
from vlsi_ray.prepare import build_model, make_collator, new_verbalizers  # noqa: E402
from vlsi_ray.recipe.stages import stage  # noqa: E402
from vlsi_ray.runners.ray.client import TeacherClient  # noqa: E402
from vlsi_ray.runners.ray.driver import ray_env  # noqa: E402
from vlsi_ray.runners.ray.teacher_pool import TeacherPool  # noqa: E402
from vlsi_ray.runners.ray.wire import encode_batch  # noqa: E402
from vlsi_ray.teacher.sources import in_process  # noqa: E402


def student_loop(objective, stepper, batches) -> float:
    """Seconds for one optimizer step per batch (the objective asks its teacher for each batch)."""
    started = time.perf_counter()
    for batch in batches:
        out = objective(batch)
        stepper.backward(out.loss, 1)
        stepper.step()
    return time.perf_counter() - started


def ideal_ratio(t_teacher: float, t_student: float) -> float:
    """b/a with perfect overlap: (T_t + T_s) / max(T_t, T_s)."""
    return (t_teacher + t_student) / max(t_teacher, t_student)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "tiny.yaml"))
    parser.add_argument(
        "--steps",
        type=int,
        default=60,
        help="batches per measurement; (b) is capped at steps/(steps+1) x ideal by its pipeline fill",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lookahead", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the five measurements, in turn; medians are printed")
    parser.add_argument(
        "--default-malloc", action="store_true", help="glibc's default allocator settings (ray.tune_malloc=false)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, ["teacher.path=null"])  # random-init tiny models of the config's sizes
    rows = generate_rows("train", args.batch_size * (args.steps + 5), seed=0)
    tokenizer = train_tokenizer(corpus_texts(rows), cfg.student.family)
    teacher = build_model(cfg, "teacher", tokenizer, torch.device("cpu"))
    student = build_model(cfg, "student", tokenizer, torch.device("cpu"))
    t_verbs, s_verbs = new_verbalizers(cfg, "teacher", teacher, 3), new_verbalizers(cfg, "student", student, 4)
    collate = make_collator(student, cfg)
    batches = [collate(rows[i * args.batch_size : (i + 1) * args.batch_size]) for i in range(args.steps + 5)]
    warm, timed = batches[:5], batches[5:]
    student.apply_lora(cfg.lora.rank, cfg.lora.alpha)

    local_teacher = in_process(cfg, teacher, t_verbs)  # the in-process runner's teacher source

    def make_objective(teacher_fn):
        objective = InteractionObjective(
            student, s_verbs, teacher_fn, cfg.matching, cfg.loss, generator=torch.Generator().manual_seed(0)
        )
        return objective, Stepper(objective.parameters(), cfg.stages.interact)

    # The student runs in this driver (niceness 0); Ray lowers its workers to niceness 15. Equal
    # priority for the teacher actor, so that neither side of the pipeline preempts the other.
    env = {**ray_env(), "RAY_worker_niceness": "0"}
    ray.init(address="local", num_cpus=2, runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False)
    tmp = tempfile.TemporaryDirectory()
    teacher.save_pretrained(Path(tmp.name) / "teacher")
    t_verbs.save(Path(tmp.name) / "verbs")

    def make_pool(overlap: bool) -> TeacherPool:
        return TeacherPool(
            dataclasses.replace(cfg.teacher_pool, overlap_host_work=overlap),
            Path(tmp.name) / "teacher",
            Path(tmp.name) / "verbs",
            cfg.signal.topk,
            cfg.loss.kd_temperature,
            None,
            cfg.signal.storage,
            tail_samples=cfg.signal.tail_samples,
            seed=stage("interact").seed(cfg.seed),  # as the in-process source: the same tail samples per row
        )

    # (b) with the replica overlapping host work with its forwards (teacher_pool.overlap_host_work, the
    # default), and (b1) with a replica that takes one request at a time.
    pool, pool_one = make_pool(True), make_pool(False)
    client, client_one = TeacherClient(pool.actors, args.lookahead), TeacherClient(pool_one.actors, args.lookahead)
    for b in warm:
        local_teacher(b)
    objective, stepper = make_objective(client)
    objective_one, stepper_one = make_objective(client_one)
    student_loop(objective, stepper, client.pipelined(iter(warm)))  # the actors' warm-up
    student_loop(objective_one, stepper_one, client_one.pipelined(iter(warm)))
    signals = {tuple(b["ids"]): local_teacher(b) for b in timed}
    fixed_objective, fixed_stepper = make_objective(lambda b: signals[tuple(b["ids"])])
    student_loop(fixed_objective, fixed_stepper, timed[:2])
    local_objective, local_stepper = make_objective(local_teacher)

    n = len(timed)
    runs: dict[str, list[float]] = {
        k: [] for k in ("t_teacher", "t_student", "a", "b", "c", "wait", "actor", "score", "ceiling", "b1", "busy", "busy1")
    }

    def pipelined(objective, stepper, client, actor) -> tuple[float, float]:
        """(samples/s, the teacher's busy fraction: its forwards' seconds over the measurement's)."""
        before = ray.get(actor.busy.remote())["forward_s"]
        seconds = student_loop(objective, stepper, client.pipelined(iter(timed)))
        return n * args.batch_size / seconds, (ray.get(actor.busy.remote())["forward_s"] - before) / seconds

    for _ in range(args.rounds):
        started = time.perf_counter()
        for b in timed:
            local_teacher(b)
        runs["t_teacher"].append((time.perf_counter() - started) / n)  # T_teacher alone
        runs["t_student"].append(student_loop(fixed_objective, fixed_stepper, timed) / n)  # T_student alone
        runs["a"].append(n * args.batch_size / student_loop(local_objective, local_stepper, timed))  # (a) sequential
        waited, forward = client.wait_seconds, client.teacher_seconds
        b, busy = pipelined(objective, stepper, client, pool.actors[0])  # (b) pipeline
        runs["b"].append(b)
        runs["busy"].append(busy)
        runs["wait"].append((client.wait_seconds - waited) / n)
        runs["actor"].append((client.teacher_seconds - forward) / n)
        # (c) the reference for (b): the actor answers every batch while this process trains on the
        # fixed signals, both at once and neither waiting for the other.
        started = time.perf_counter()
        answers = [pool.actors[0].signal.remote(encode_batch(b)) for b in timed]
        student_loop(fixed_objective, fixed_stepper, timed)
        ray.get(answers)
        runs["c"].append(n * args.batch_size / (time.perf_counter() - started))
        b1, busy1 = pipelined(objective_one, stepper_one, client_one, pool_one.actors[0])  # (b1): one request at a time
        runs["b1"].append(b1)
        runs["busy1"].append(busy1)
        ideal = ideal_ratio(runs["t_teacher"][-1], runs["t_student"][-1])
        runs["score"].append(runs["b"][-1] / runs["a"][-1] / ideal)
        runs["ceiling"].append(runs["c"][-1] / runs["a"][-1] / ideal)
        print(
            f"round {len(runs['score'])}: T_teacher {runs['t_teacher'][-1]:.3f}  T_student {runs['t_student'][-1]:.3f}  "
            f"(a) {runs['a'][-1]:.1f}  (b) {runs['b'][-1]:.1f}  (b1) {runs['b1'][-1]:.1f}  (c) {runs['c'][-1]:.1f} samples/s  "
            f"teacher busy {runs['busy'][-1]:.2f} / {runs['busy1'][-1]:.2f}  (actor's forward {runs['actor'][-1]:.3f})  b/a / ideal {runs['score'][-1]:.2f}  c/a / ideal {runs['ceiling'][-1]:.2f}",
            flush=True,
        )
    pool.shutdown()
    pool_one.shutdown()
    ray.shutdown()
    tmp.cleanup()
    m = {k: statistics.median(v) for k, v in runs.items()}  # the medians over the rounds
    # Every ratio of the summary is computed one way, from these medians (the table row in docs/BENCHMARKS.md);
    # the per-round ratios only give the spread.
    ideal = ideal_ratio(m["t_teacher"], m["t_student"])
    print(f"medians of {args.rounds} rounds (batch {args.batch_size}, {n} steps per measurement, 1 thread each):")
    print(f"T_teacher {m['t_teacher']:.3f} s/step   T_student {m['t_student']:.3f} s/step   ideal ratio {ideal:.2f}")
    print(f"(a) in-process sequential: {m['a']:.1f} samples/s")
    print(
        f"(b) Ray actor pipeline:    {m['b']:.1f} samples/s   student waits {m['wait'] * 1000:.0f} ms/step on the teacher, "
        f"whose forward takes {m['actor']:.3f} s/step in the actor"
    )
    print(
        f"(b1) the same, a replica taking one request at a time (teacher_pool.overlap_host_work=false): {m['b1']:.1f} "
        f"samples/s;  b/b1 {m['b'] / m['b1']:.2f}"
    )
    print(
        f"teacher busy fraction (its forwards' share of the measurement): {m['busy']:.2f} overlapping host work, "
        f"{m['busy1']:.2f} one request at a time (per round {min(runs['busy']):.2f}-{max(runs['busy']):.2f} and "
        f"{min(runs['busy1']):.2f}-{max(runs['busy1']):.2f})"
    )
    print(f"(c) both at once, nothing to wait for: {m['c']:.1f} samples/s;  b/c {m['b'] / m['c']:.2f}")
    print(
        f"b/a {m['b'] / m['a']:.2f}   b/a / ideal {m['b'] / m['a'] / ideal:.2f} (per round {min(runs['score']):.2f}-"
        f"{max(runs['score']):.2f}; goal >= 0.90, filling the pipeline caps it at {n / (n + 1):.2f})   "
        f"c/a / ideal {m['c'] / m['a'] / ideal:.2f} (per round {min(runs['ceiling']):.2f}-{max(runs['ceiling']):.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
