"""Student peak memory and step time: step 2 vs the number of candidates, and gradient checkpointing on vs off.

    python bench/memory.py --candidates 1 20       # vocabulary 152,064, 1,024 response tokens; shared vs per-pair KLs
    python bench/memory.py                         # C = 1 4 14 20
    python bench/memory.py --student-layers 2      # t_s = 2: the band of each of 2 student layers has C entries
    python bench/memory.py --candidates 1 20 --chunk-size 256 --candidate-kls shared
    python bench/memory.py --checkpointing         # step 3 (full LLM) at 512 and 2,048 tokens, checkpointing off vs on
    python bench/memory.py --teacher               # the teacher's signal at 4, 10 and 20 target layers (V = 152,064)

One :class:`InteractionObjective` step (candidate KLs without grad over the matching band, then the
chosen pairs and the last layer recomputed with grad, then ``loss.backward()``) on a real tiny
Qwen2-VL student whose LM head has the real 152,064 rows, with LoRA and real verbalizers, against a
synthetic top-64 + tail teacher signal with ``t_l = t_s + C - 1`` target layers, so that with the
paper's search range every student target layer has exactly ``C`` candidate teacher layers.

The candidate KLs run two ways, side by side: ``shared`` is the objective's own
:func:`~vlsi_ray.method.losses.candidate_kls` (the vocabulary normalised once per student layer and
chunk, each top-k candidate then ``O(k)``); ``per-pair`` calls
:func:`~vlsi_ray.method.losses.per_token_kl` once per candidate (a log-softmax and a log-sum-exp over
the vocabulary each time: the implementation before ``candidate_kls``).

Each (mode, C) runs ``--repeats`` times (default 3), each in a fresh subprocess, so peaks do not
mix; the table gives medians, the step time with its min and max. Peak = the highest resident set
size during the step minus the resident set size just before it (models, batch and signal already
built): the kernel's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), checked
against a thread sampling ``/proc/self/statm`` every millisecond. On a GPU (picked when CUDA is
available, or with ``--device``) it is ``torch.cuda.max_memory_allocated`` over the allocated
baseline. Goals: peak(C) <= 1.2 × peak(1) for every C, and the step time at the largest C <= 1.2 ×
the step time at C = 1 (medians).

``--teacher`` measures the teacher's side instead: the peak of :func:`teacher_signal` for one batch
(256 response tokens) at 4, 10 and 20 target layers, layer by layer (each head's logits reduced to
top-k before the next head runs) beside all layers' logits stacked first (the implementation before);
goal: peak(20) <= 1.1 × peak(4), layer by layer.

The table also gives the peak reached by the end of the candidate KLs and the number of candidate
KLs the objective evaluated (the signals passed to ``candidate_kls`` in :mod:`vlsi_ray.method.steps`,
divided by the chunks per layer).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

import psutil  # noqa: E402
import torch  # noqa: E402

from vlsi_ray.data.synthetic import corpus_texts, generate_rows  # noqa: E402
from vlsi_ray.method import steps  # noqa: E402
from vlsi_ray.method.losses import per_token_kl  # noqa: E402
from vlsi_ray.method.matching import MatchingOptions, band_mask  # noqa: E402
from vlsi_ray.method.steps import SFT_GROUPS, SFTObjective  # noqa: E402
from vlsi_ray.models.qwen2_vl import build_tiny  # noqa: E402
from vlsi_ray.models.tokenizer import train_tokenizer  # noqa: E402
from vlsi_ray.models.verbalizer import Verbalizers  # noqa: E402
from vlsi_ray.signals.produce import teacher_signal  # noqa: E402
from vlsi_ray.signals.teacher_signal import TeacherSignal  # noqa: E402

MB = 1e6  # decimal megabytes, as the table prints them
GOAL = 1.2  # peak(C) / peak(1) must stay at or below this
TEACHER_GOAL = 1.1  # teacher signal peak at the most target layers / at the fewest
TIME_GOAL = 1.2  # step time at the most candidates / at C = 1 (candidate KLs shared)
FAMILY = "qwen2_vl"
PROMPT_TOKENS = 16  # non-response tokens before the response


# ------------------------------------------------------------------------------------------ inputs
def synthetic_signal(num_layers: int, num_tokens: int, vocab_size: int, k: int, generator: torch.Generator) -> TeacherSignal:
    """A top-``k`` + tail teacher signal of ``num_layers`` layers at ``num_tokens`` tokens.

    One layer comes from random peaked logits ``[1, N, V]`` through :meth:`TeacherSignal.from_logits`
    (Gaussian logits plus a +10 peak at one random id per token, so the top 64 hold most of the
    mass); layer ``j`` is that distribution with the vocabulary rotated by ``j·7919`` ids, i.e.
    exactly ``from_logits`` of the rotated logits, without paying a ``[N, V]`` top-k per layer.
    Returns ``topk_logprobs [L, N, k]``, ``topk_ids [L, N, k]``, ``tail_logmass [L, N]``.
    """
    logits = torch.randn(num_tokens, vocab_size, generator=generator)
    peaks = torch.randint(vocab_size, (num_tokens,), generator=generator)
    logits[torch.arange(num_tokens), peaks] += 10.0
    base = TeacherSignal.from_logits(logits[None], k)
    del logits
    shifts = torch.arange(num_layers)[:, None, None] * 7919
    return TeacherSignal(
        topk_logprobs=base.topk_logprobs.expand(num_layers, -1, -1).clone(),
        topk_ids=(base.topk_ids + shifts) % vocab_size,
        tail_logmass=base.tail_logmass.expand(num_layers, -1).clone(),
        vocab_size=vocab_size,
    )


def response_batch(num_response: int, prompt: int, token_ids: int, generator: torch.Generator) -> dict:
    """One text-only row with exactly ``num_response`` response positions, as model inputs.

    ``input_ids [1, T]`` (random ids below ``token_ids``), ``attention_mask [1, T]``,
    ``mm_token_type_ids [1, T]`` (zeros: no image) and ``labels [1, T]`` (-100 on the ``prompt``
    tokens), ``T = prompt + num_response``. Position ``t`` predicts ``labels[t + 1]``, so positions
    ``prompt - 1 .. T - 2`` carry the loss: ``num_response`` of them.
    """
    length = prompt + num_response
    input_ids = torch.randint(token_ids, (1, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(1, length, dtype=torch.long),
        "mm_token_type_ids": torch.zeros(1, length, dtype=torch.int),
        "labels": labels,
    }


# ------------------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes (``/proc/self/statm``, psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak resident set size over a block, in bytes above the RSS at entry.

    ``peak`` is the kernel's high-water mark (``VmHWM`` after a reset through ``/proc/self/clear_refs``)
    when that works, else the sampled maximum; ``sampled`` is a 1 ms sampling thread's maximum (it can
    miss a short spike, never overstate one). ``mark(name)`` records the peak so far under ``name``.
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.marks: dict[str, int] = {}

    def _hwm(self) -> int | None:
        kb = _status_kb("VmHWM") if self._reset_ok else None
        return None if kb is None else kb * 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._reset_ok = _status_kb("VmHWM") is not None
        except OSError:
            self._reset_ok = False
        self.baseline = current_rss()
        self._max = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def peak_so_far(self) -> int:
        """Bytes above the baseline reached so far."""
        hwm = self._hwm()
        return (hwm if hwm is not None else max(self._max, current_rss())) - self.baseline

    def mark(self, name: str) -> None:
        """Record :meth:`peak_so_far` as ``marks[name]``."""
        self.marks[name] = self.peak_so_far()

    def __exit__(self, *exc) -> None:
        self.peak = self.peak_so_far()
        self._stop.set()
        self._thread.join()
        self.sampled = self._max - self.baseline
        self.source = "VmHWM" if self._reset_ok else "sampled RSS"


class PeakCUDA:
    """Peak ``torch.cuda.max_memory_allocated`` over a block, in bytes above the allocation at entry."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: dict[str, int] = {}

    def __enter__(self) -> PeakCUDA:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        return self

    def peak_so_far(self) -> int:
        """Bytes above the baseline reached so far."""
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.baseline

    def mark(self, name: str) -> None:
        """Record :meth:`peak_so_far` as ``marks[name]``."""
        self.marks[name] = self.peak_so_far()

    def __exit__(self, *exc) -> None:
        self.peak = self.sampled = self.peak_so_far()
        self.source = "cuda max_memory_allocated"


# ------------------------------------------------------------------------------------------ one C
def per_pair_kls(signals, student_logits, direction="forward", temperature=1.0) -> torch.Tensor:
    """The matching's candidate KLs one :func:`per_token_kl` per candidate (each normalising the whole
    vocabulary again): what ``--candidate-kls per-pair`` times against :func:`candidate_kls`."""
    with torch.no_grad():
        return torch.stack([per_token_kl(s, student_logits, direction, temperature).float() for s in signals])


def measure(candidates: int, args: argparse.Namespace) -> dict:
    """Build everything for ``candidates`` teacher layers per student layer, then measure one step.

    Student: tiny Qwen2-VL LM (``args.hidden`` wide, ``t_s + 1`` blocks, target blocks ``1..t_s``)
    with a ``[V, d]`` LM head, ``V = args.vocab``; LoRA; residual verbalizers. Teacher: a synthetic
    signal with ``t_l + 1 = t_s + C`` layers over the batch's ``N = args.tokens`` response tokens.
    Returns the peak (bytes above the pre-step baseline), the peak reached by the end of the
    candidate KLs and by the end of the loss forward, the band sizes (candidates per student layer),
    the candidate KLs the objective evaluated, and the step's wall time.
    """
    device = torch.device(args.device)
    t_s = args.student_layers
    t_l = t_s + candidates - 1
    generator = torch.Generator().manual_seed(0)
    tokenizer = train_tokenizer(corpus_texts(generate_rows("train", 8, seed=0)), FAMILY)
    student = build_tiny(
        "student", tokenizer, hidden_size=args.hidden, num_layers=t_s + 1, num_heads=4, intermediate_size=2 * args.hidden,
        vision_embed_dim=32, vision_depth=1, vocab_size=args.vocab, seed=2,
    )  # fmt: skip
    student.model.to(device)
    student.apply_lora(args.lora_rank, args.lora_rank)
    torch.manual_seed(4)
    verbalizers = Verbalizers(student.hidden_size, list(range(1, t_s + 1))).to(device)
    batch = {k: v.to(device) for k, v in response_batch(args.tokens, PROMPT_TOKENS, len(tokenizer), generator).items()}
    signal = synthetic_signal(t_l + 1, args.tokens, args.vocab, args.topk, generator).to(device)
    options = MatchingOptions(search_range=True, order_preservation=True)
    band = band_mask(t_s, t_l, options)
    objective = steps.InteractionObjective(
        student,
        verbalizers,
        lambda b: signal,
        options,
        steps.LossOptions(chunk_size=args.chunk_size),
        generator=torch.Generator().manual_seed(0),
    )

    # Count the candidate KLs the objective evaluates (per chunk) and mark the peak when they end.
    evaluated = [0]
    kls = steps.candidate_kls if args.candidate_kls == "shared" else per_pair_kls

    def counting_kls(signals, *a, **kw):
        evaluated[0] += len(signals)
        return kls(signals, *a, **kw)

    steps.candidate_kls = counting_kls
    meter = PeakCUDA(device) if device.type == "cuda" else PeakRSS()
    distances = objective._candidate_distances

    def marked(*a, **kw):
        out = distances(*a, **kw)
        meter.mark("candidates")
        return out

    objective._candidate_distances = marked
    started = time.perf_counter()
    with meter:
        out = objective(batch)
        meter.mark("loss")
        out.loss.backward()
    seconds = time.perf_counter() - started
    chunks = -(-args.tokens // args.chunk_size)
    return {
        "C": candidates,
        "t_s": t_s,
        "t_l": t_l,
        "band": [int(n) for n in band.sum(1)],
        "evaluated": evaluated[0] // chunks,
        "peak": meter.peak,
        "sampled": meter.sampled,
        "candidates_peak": meter.marks.get("candidates"),
        "loss_peak": meter.marks.get("loss"),
        "source": meter.source,
        "device": str(device),
        "matched": out.metrics["matched"],
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------ checkpointing
def measure_checkpointing(length: int, enabled: bool, args: argparse.Namespace) -> dict:
    """Peak memory of one step-3 step (full-LLM SFT, forward + backward) on a ``length``-token text row.

    Student: tiny Qwen2-VL LM, ``args.ckpt_hidden`` wide, ``args.ckpt_layers`` blocks, a small
    vocabulary (so activations, not the LM head, dominate), in train mode, gradient checkpointing
    ``enabled``; half the row is response. Returns the peak above the pre-step baseline and the loss.
    """
    device = torch.device(args.device)
    tokenizer = train_tokenizer(corpus_texts(generate_rows("train", 8, seed=0)), FAMILY)
    student = build_tiny(
        "student", tokenizer, hidden_size=args.ckpt_hidden, num_layers=args.ckpt_layers, num_heads=4,
        intermediate_size=4 * args.ckpt_hidden, vision_embed_dim=32, vision_depth=1, seed=2,
    )  # fmt: skip
    student.model.to(device)
    student.set_gradient_checkpointing(enabled)
    student.model.train()
    objective = SFTObjective(student, SFT_GROUPS)
    batch = {
        k: v.to(device)
        for k, v in response_batch(length // 2, length - length // 2, len(tokenizer), torch.Generator().manual_seed(0)).items()
    }
    meter = PeakCUDA(device) if device.type == "cuda" else PeakRSS()
    started = time.perf_counter()
    with meter:
        out = objective(batch)
        out.loss.backward()
    return {
        "length": length,
        "checkpointing": enabled,
        "peak": meter.peak,
        "loss": out.loss.item(),
        "seconds": time.perf_counter() - started,
        "source": meter.source,
    }


# ------------------------------------------------------------------------------------------ subprocesses
def run_child(argv: list[str], args: argparse.Namespace, what: str) -> dict:
    """Run this script's measurement ``argv`` (``--child...``) in a fresh interpreter (``--threads`` passed on) and
    return the dict it prints on its ``RESULT`` line; exit naming ``what`` if it fails."""
    argv = [sys.executable, str(Path(__file__).resolve()), *argv] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the {what} measurement failed (exit {proc.returncode}).")
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------------------ teacher signal
def all_layers_at_once(teacher, verbalizers, batch: dict, topk: int) -> TeacherSignal:
    """The teacher's signal built from every layer's logits stacked first (``[t_l + 1, N, V]``, then a copy by
    ``torch.stack``): how :func:`teacher_signal` worked before it took each layer's top-k as the head ran."""
    out = teacher.forward(steps.model_inputs(batch), logits=False)
    mask, _ = steps.response_positions(batch["labels"])
    layers = [verbalizers.head(layer, teacher.final_norm, teacher.lm_head)(out.hidden_states[layer][mask]).float()
              for layer in verbalizers.layers]  # fmt: skip
    layers.append(teacher.lm_head(out.hidden_states[-1][mask]).float())
    return TeacherSignal.from_logits(torch.stack(layers), topk)


def measure_teacher(layers: int, mode: str, args: argparse.Namespace) -> dict:
    """Peak memory of the teacher's side of one step-2 batch with ``layers`` target layers (``mode``:
    ``layer-by-layer`` = :func:`teacher_signal`, ``all-at-once`` = :func:`all_layers_at_once`).

    Teacher: tiny Qwen2-VL LM (``args.hidden`` wide, ``layers + 1`` blocks, target blocks ``1..layers``)
    with a ``[V, d]`` LM head, ``V = args.vocab``, residual verbalizers; one row of ``args.teacher_tokens``
    response tokens; top-``args.topk`` + tail. Returns the peak above the pre-step baseline and the time.
    """
    device = torch.device(args.device)
    tokenizer = train_tokenizer(corpus_texts(generate_rows("train", 8, seed=0)), FAMILY)
    teacher = build_tiny(
        "teacher", tokenizer, hidden_size=args.hidden, num_layers=layers + 1, num_heads=4, intermediate_size=2 * args.hidden,
        vision_embed_dim=32, vision_depth=1, vocab_size=args.vocab, seed=1,
    )  # fmt: skip
    teacher.model.to(device).eval()
    torch.manual_seed(3)
    verbalizers = Verbalizers(teacher.hidden_size, list(range(1, layers + 1))).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    batch = {k: v.to(device) for k, v in response_batch(args.teacher_tokens, PROMPT_TOKENS, len(tokenizer), generator).items()}
    meter = PeakCUDA(device) if device.type == "cuda" else PeakRSS()
    started = time.perf_counter()
    with meter, torch.no_grad():
        if mode == "layer-by-layer":
            signal = teacher_signal(teacher, verbalizers, batch, args.topk)
        else:
            signal = all_layers_at_once(teacher, verbalizers, batch, args.topk)
    return {
        "layers": layers,
        "mode": mode,
        "peak": meter.peak,
        "seconds": time.perf_counter() - started,
        "source": meter.source,
        "checksum": float(signal.topk_logprobs.double().sum()),  # the layers' top-k log-probs, summed
    }


def teacher_table(args: argparse.Namespace) -> int:
    """Run :func:`measure_teacher` for each mode and layer count (fresh subprocesses, ``--repeats`` rounds)."""
    dense = args.teacher_tokens * args.vocab * 4
    print(
        f"teacher signal of one batch: vocabulary {args.vocab:,}, {args.teacher_tokens:,} response tokens, top-{args.topk} "
        f"+ tail, teacher {args.hidden} wide, device {args.device}; MB = 10^6 bytes above the pre-step baseline; "
        f"one [{args.teacher_tokens}, {args.vocab}] fp32 logits tensor = {dense / MB:.1f} MB; medians of {args.repeats} run(s)\n"
    )
    modes = ("all-at-once", "layer-by-layer")
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for mode in modes:
            for layers in args.teacher_layers:
                argv = ["--child-teacher", str(layers), mode, "--teacher-tokens", str(args.teacher_tokens),
                        "--vocab", str(args.vocab), "--topk", str(args.topk), "--hidden", str(args.hidden), "--device", args.device]  # fmt: skip
                runs.setdefault((mode, layers), []).append(run_child(argv, args, f"{layers}-layer {mode}"))
                print(f"  {mode}, {layers} target layers: {runs[mode, layers][-1]['peak'] / MB:.0f} MB", flush=True)
    first = args.teacher_layers[0]
    print()
    print(f"| signal | target layers | peak MB | peak ÷ one layer's logits | peak vs {first} layers | s | same signal |")
    print("|---|---|---|---|---|---|---|")
    worst = {}
    for mode in modes:
        base = median(r["peak"] for r in runs[mode, first])
        for layers in args.teacher_layers:
            rs = runs[mode, layers]
            peak = median(r["peak"] for r in rs)
            # CPU matmuls may round differently from one process to the next: the same signal to 1e-6.
            reference = runs["all-at-once", layers][0]["checksum"]
            same = all(abs(r["checksum"] - reference) <= 1e-6 * abs(reference) for r in rs)
            worst[mode] = max(worst.get(mode, 0.0), peak / base)
            print(
                f"| {mode} | {layers} | {peak / MB:.0f} | {peak / dense:.2f} | {peak / base:.2f} | "
                f"{median(r['seconds'] for r in rs):.1f} | {'yes' if same else 'NO'} |"
            )
    print()
    for mode in modes:
        verdict = "MET" if worst[mode] <= TEACHER_GOAL else "MISSED"
        print(
            f"goal ({mode}): peak <= {TEACHER_GOAL} x the {first}-layer peak at every layer count -> worst {worst[mode]:.2f}: {verdict}"
        )
    return 0


def checkpointing_table(args: argparse.Namespace) -> int:
    """Run :func:`measure_checkpointing` off and on at each length (fresh subprocesses); print the ratios."""
    print(
        f"step 3 (full-LLM SFT) forward + backward, student {args.ckpt_layers} x {args.ckpt_hidden}, device {args.device}; "
        "MB = 10^6 bytes above the pre-step baseline\n"
    )
    print("| tokens | peak MB, checkpointing off | peak MB, on | on ÷ off | loss off | loss on | step s off / on |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        pair = {}
        for enabled in (False, True):
            argv = ["--child-checkpointing", str(length), str(int(enabled)), "--ckpt-hidden", str(args.ckpt_hidden),
                    "--ckpt-layers", str(args.ckpt_layers), "--device", args.device]  # fmt: skip
            pair[enabled] = run_child(argv, args, f"{length}-token")
        off, on = pair[False], pair[True]
        print(
            f"| {length:,} | {off['peak'] / MB:.0f} | {on['peak'] / MB:.0f} | {on['peak'] / off['peak']:.2f} | "
            f"{off['loss']:.6f} | {on['loss']:.6f} | {off['seconds']:.1f} / {on['seconds']:.1f} |"
        )
    return 0


# ------------------------------------------------------------------------------------------ driver
def _child_argv(candidates: int, args: argparse.Namespace, mode: str) -> list[str]:
    return [
        "--child", str(candidates), "--candidate-kls", mode, "--tokens", str(args.tokens),
        "--vocab", str(args.vocab), "--topk", str(args.topk), "--hidden", str(args.hidden),
        "--student-layers", str(args.student_layers), "--chunk-size", str(args.chunk_size),
        "--lora-rank", str(args.lora_rank), "--device", args.device,
    ]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 4, 14, 20], help="teacher layers per student layer")
    parser.add_argument("--tokens", type=int, default=1024, help="response tokens in the batch (N)")
    parser.add_argument("--vocab", type=int, default=152_064, help="LM head rows (V)")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64, help="student width d")
    parser.add_argument("--student-layers", type=int, default=1, help="student target layers t_s (each gets C candidates)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="the objective's chunk_size (tokens per [chunk, V] logits)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--candidate-kls", choices=["shared", "per-pair", "both"], default="both",
                        help="the objective's candidate_kls (shared: one normalisation per chunk), the per_token_kl-per-candidate "
                        "reference, or both side by side")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="runs of every (mode, C); the table gives medians")
    parser.add_argument("--checkpointing", action="store_true", help="measure gradient checkpointing off vs on instead")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="--checkpointing: tokens per row")
    parser.add_argument("--ckpt-hidden", type=int, default=256, help="--checkpointing: student width")
    parser.add_argument("--ckpt-layers", type=int, default=8, help="--checkpointing: student decoder blocks")
    parser.add_argument("--teacher", action="store_true", help="measure the teacher signal's peak vs its target layers instead")
    parser.add_argument("--teacher-layers", type=int, nargs="+", default=[4, 10, 20], help="--teacher: target layers t_l")
    parser.add_argument("--teacher-tokens", type=int, default=256, help="--teacher: response tokens in the batch")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-teacher", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-checkpointing", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        print("RESULT " + json.dumps(measure(args.child, args)), flush=True)
        return 0
    if args.child_checkpointing is not None:
        length, enabled = args.child_checkpointing
        print("RESULT " + json.dumps(measure_checkpointing(length, bool(enabled), args)), flush=True)
        return 0
    if args.child_teacher is not None:
        print("RESULT " + json.dumps(measure_teacher(int(args.child_teacher[0]), args.child_teacher[1], args)), flush=True)
        return 0
    if args.checkpointing:
        return checkpointing_table(args)
    if args.teacher:
        return teacher_table(args)

    dense = args.tokens * args.vocab * 4
    modes = ["per-pair", "shared"] if args.candidate_kls == "both" else [args.candidate_kls]
    print(
        f"vocabulary {args.vocab:,}, {args.tokens:,} response tokens, top-{args.topk} + tail signal, "
        f"t_s = {args.student_layers} student target layers, chunk_size {args.chunk_size}, device {args.device}, "
        f"candidate KLs {' vs '.join(modes)}, {args.repeats} run(s) per row"
    )
    print(f"one dense [{args.tokens}, {args.vocab}] fp32 logits tensor: {dense / MB:.1f} MB")
    runs: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):  # rounds of every (mode, C): a slow spell of the machine hits them all
        for mode in modes:
            for c in args.candidates:
                runs.setdefault((mode, c), []).append(run_child(_child_argv(c, args, mode), args, f"C={c} ({mode})"))
                print(f"  round {repeat + 1}/{args.repeats} {mode} C={c}: {runs[mode, c][-1]['seconds']:.1f} s", flush=True)
    first = runs[modes[0], args.candidates[0]][0]
    base_c = 1 if 1 in args.candidates else args.candidates[0]
    print(f"\npeak = {first['source']} above the pre-step baseline; MB = 10^6 bytes; medians of {args.repeats} run(s), "
          "(min-max) beside the step time\n")  # fmt: skip
    print(
        f"| candidate KLs | C | t_l | candidates per student layer | candidate KLs evaluated | peak MB | peak ÷ dense | "
        f"by end of candidate KLs MB | peak vs C={base_c} | step s | step s vs C={base_c} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst_peak, time_ratio = {}, {}
    for mode in modes:
        base = runs[mode, base_c]
        for c in args.candidates:
            rs = runs[mode, c]
            peak, seconds = median(r["peak"] for r in rs), median(r["seconds"] for r in rs)
            cand = [r["candidates_peak"] for r in rs if r["candidates_peak"] is not None]
            peak_ratio = peak / median(r["peak"] for r in base)
            step_ratio = seconds / median(r["seconds"] for r in base)
            worst_peak[mode] = max(worst_peak.get(mode, 0.0), peak_ratio)
            time_ratio[mode] = step_ratio  # the last C's: the most candidates
            spread = f"{min(r['seconds'] for r in rs):.1f}-{max(r['seconds'] for r in rs):.1f}"
            print(
                f"| {mode} | {c} | {rs[0]['t_l']} | {'/'.join(map(str, rs[0]['band']))} | {rs[0]['evaluated']} | "
                f"{peak / MB:.0f} | {peak / dense:.2f} | {median(cand) / MB if cand else float('nan'):.0f} | "
                f"{peak_ratio:.2f} | {seconds:.1f} ({spread}) | {step_ratio:.2f} |"
            )
    last = args.candidates[-1]
    print()
    for mode in modes:
        verdict = "MET" if worst_peak[mode] <= GOAL else "MISSED"
        print(
            f"memory goal ({mode}): peak <= {GOAL} x the C={base_c} peak for every C -> worst {worst_peak[mode]:.2f}: {verdict}"
        )
    for mode in modes:
        verdict = "MET" if time_ratio[mode] <= TIME_GOAL else "MISSED"
        print(f"time goal ({mode}): step time at C={last} <= {TIME_GOAL} x at C={base_c} -> {time_ratio[mode]:.2f}: {verdict}")
    if len(modes) == 2:
        print(f"shared vs per-pair at C={last}: step time ratio per-pair / shared = "
              f"{median(r['seconds'] for r in runs['per-pair', last]) / median(r['seconds'] for r in runs['shared', last]):.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
