"""The Ray runner: teacher actors, the student on Ray Train fed by Ray Data, evaluation as Ray tasks.

Same recipe as :mod:`vlsi_ray.runner` (setup → stages → evaluate → report), same objectives, same
seeds and batch order, so with one worker it reproduces the in-process run. Each stage is one
``TorchTrainer`` run whose storage is ``<run_dir>/ray_train/<stage>``: re-running the same command
skips finished stages (``stage.json``) and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vlsi_ray.actors.client import TeacherClient
from vlsi_ray.actors.student import StageSpec, train_student
from vlsi_ray.actors.teacher import TeacherPool
from vlsi_ray.config import EVAL_MODELS, RunConfig, to_yaml
from vlsi_ray.eval.report import write_report
from vlsi_ray.method.loop import total_optimizer_steps
from vlsi_ray.method.steps import SFT_GROUPS
from vlsi_ray.metrics import read_metrics
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.prepare import check_pair_paths, new_verbalizers
from vlsi_ray.runner import PRETRAIN_SEED_OFFSET, SEED_OFFSET, STAGE_FILE, Run
from vlsi_ray.teacher_cache import open_cache, require_cache


def ray_env() -> dict[str, str]:
    """Environment variables every actor and worker gets: the offline defaults and quieter Train logs.

    ``DS_ACCELERATOR`` goes along only when the user set it: otherwise each worker picks its own
    (cuda where it sees a GPU), whatever the driver's machine has.
    """
    from vlsi_ray.env import DEFAULTED

    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE", "WANDB_SILENT", "DS_ACCELERATOR",
                                       "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY") if k in os.environ and k not in DEFAULTED}
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # worker progress lines once, not twice
    return env


def connect(cfg: RunConfig) -> str:
    """Join the cluster at ``ray.address`` (or ``RAY_ADDRESS``), else a Ray already running on this machine
    (e.g. ``ray start --head``; Ray's ``address="auto"``), else start a local Ray (``ray.num_cpus``/``num_gpus``);
    return which."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": ray_env()})
        return f"cluster at {address}"
    try:  # a Ray already running on this machine
        ray.init(address="auto", runtime_env={"env_vars": ray_env()})
        return "the Ray cluster running on this machine"
    except ConnectionError:
        pass
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=cfg.ray.include_dashboard,
             runtime_env={"env_vars": ray_env()})
    return "local Ray"


def _data_context() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the seeded order is the batch order
    ctx.enable_progress_bars = False


class RayRun(Run):
    """The Ray runner's state; stages run as Ray Train runs, the teacher as a pool of actors."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.cfg_yaml = to_yaml(cfg)
        self.dir = self.dir.resolve()
        self._split = None
        self._evals: dict[str, list] = {}  # model name -> ObjectRefs of its test pass, one per slice
        self._test_slices = None
        self._split_lock = threading.Lock()  # the teacher's and the student's pretraining start together
        self.use_gpu = cfg.train.use_gpu
        if self.use_gpu is None:
            import ray

            self.use_gpu = ray.cluster_resources().get("GPU", 0) > 0

    def split(self):
        """The validated train split on Ray Data, read once per run (every stage orders it its own way)."""
        from vlsi_ray.data.ray_dataset import train_split

        with self._split_lock:
            if self._split is None:
                self._split = train_split(self.cfg.data.dir, self.cfg.data.on_error, self.cfg.data.sort_in_memory_mb)
        return self._split

    def spec(self, stage: str, kind: str, settings: str, model_dir: Path, seed: int, **kw) -> StageSpec:
        opt = getattr(self.cfg.stages, settings)
        rows = len(self.train_rows(settings))
        total = total_optimizer_steps(opt, rows, self.cfg.train.num_workers)
        return StageSpec(stage=stage, kind=kind, settings=settings, cfg_yaml=self.cfg_yaml, model_dir=str(model_dir),
                         out_dir=str(self.stage_dir(stage.split("/")[0])), metrics_path=str(self.dir / "metrics.jsonl"),
                         seed=seed, total_steps=total, **kw)

    def fit(self, spec: StageSpec) -> list[dict]:
        """Run one stage on Ray Train (resuming from its last checkpoint); return its logged history."""
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        from vlsi_ray.data.ray_dataset import train_dataset

        _data_context()
        cfg, opt = self.cfg, getattr(self.cfg.stages, spec.settings)
        workers = cfg.train.num_workers
        dataset = train_dataset(self.split(), opt.tasks, spec.seed, opt.batch_size * workers,
                                spec.total_steps * opt.grad_accum, [r["id"] for r in self.train_rows(spec.settings)])
        res = cfg.train.resources_per_worker
        per_worker = {"CPU": res.num_cpus, **res.resources}
        if self.use_gpu:
            per_worker["GPU"] = res.num_gpus or 1
        name = spec.stage.replace("/", "-")
        trainer = TorchTrainer(
            train_student,
            train_loop_config={"spec": spec},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=self.use_gpu, resources_per_worker=per_worker),
            torch_config=TorchConfig(backend="nccl" if self.use_gpu else "gloo"),
            datasets={"train": dataset},
            dataset_config=ray.train.DataConfig(datasets_to_split="all"),
            run_config=ray.train.RunConfig(
                name=name, storage_path=str(self.dir / "ray_train"),
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        trainer.fit()
        history = [r for r in read_metrics(self.dir / "metrics.jsonl", spec.stage)]
        return _last_run(history)

    def pretrain(self, role: str, stage: str, backbone: Backbone, target: Path) -> list[dict]:
        init = self.dir / "ray_train" / f"{stage}-init"
        backbone.save_pretrained(init)
        spec = self.spec(stage, "sft", stage, init, self.cfg.seed + PRETRAIN_SEED_OFFSET[role], model_out=str(target))
        return self.fit(spec)

    def evaluate(self, named_dirs: dict[str, Path]) -> None:
        """Start the test pass of each checkpoint in ``eval_models`` as ``eval_tasks`` Ray tasks (one slice
        of the test split each) and return at once: the passes run while later stages train;
        :meth:`accuracy` collects them."""
        import ray

        named_dirs = {name: path for name, path in named_dirs.items() if name in self.cfg.eval_models}
        if not named_dirs:
            return
        if self._test_slices is None:
            rows, n = self.test_rows(), self.cfg.eval_tasks
            self._test_slices = [ray.put(rows[i * len(rows) // n:(i + 1) * len(rows) // n]) for i in range(n)]
        res = self.cfg.train.resources_per_worker
        task = ray.remote(_predict_letters).options(num_cpus=res.num_cpus, num_gpus=(res.num_gpus or 1) if self.use_gpu else 0)
        for name, path in named_dirs.items():
            self._evals[name] = [task.remote(str(path), self.cfg_yaml, rows) for rows in self._test_slices]

    def accuracy(self) -> dict[str, dict]:
        """Wait for every test pass started by :meth:`evaluate`; return the accuracies by model name."""
        import ray

        from vlsi_ray.eval.accuracy import accuracy_report

        rows, results = self.test_rows(), {}
        for name in sorted(self._evals, key=EVAL_MODELS.index):  # the report's order
            predictions = [letter for part in ray.get(self._evals[name]) for letter in part]
            results[name] = accuracy_report(rows, predictions)
            print(f"[eval] {name}: {100 * results[name]['overall']:.1f}% on {results[name]['n']} test questions", flush=True)
        return results


def _last_run(history: list[dict]) -> list[dict]:
    """The records of the latest attempt: a resumed stage logs steps again from its checkpoint on."""
    by_step: dict[int, dict] = {}
    for record in history:
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _predict_letters(model_dir: str, cfg_yaml: str, rows: list[dict]) -> list[str]:
    """The option letter the checkpoint at ``model_dir`` picks for each of ``rows`` (a Ray task)."""
    from vlsi_ray.config import config_from_yaml
    from vlsi_ray.env import set_offline_defaults
    from vlsi_ray.eval.accuracy import letter_token_ids, predict_letters
    from vlsi_ray.prepare import make_collator, resolve_device

    set_offline_defaults()
    cfg = config_from_yaml(cfg_yaml)
    device = resolve_device(cfg.device)
    backbone = Backbone.from_pretrained(model_dir, device=device)
    return predict_letters(backbone, rows, make_collator(backbone, cfg), letter_token_ids(backbone.tokenizer), cfg.eval_batch_size, device)


def run_ray(cfg: RunConfig) -> dict:
    """Run every stage in ``cfg.steps`` on Ray (joining or starting a cluster) and return the report dict."""
    import ray

    started = time.perf_counter()
    require_cache(cfg)  # before any Ray work
    where = connect(cfg)
    print(f"[ray] {where}: {ray.cluster_resources()}", flush=True)
    run = RayRun(cfg)
    if cfg.teacher.path and cfg.student.path:  # real checkpoints: refuse an incompatible pair before any training
        check_pair_paths(cfg.teacher.path, cfg.student.path)  # configs and tokenizers only: cheap on the head

    def sft_stage(stage: str, source: Path) -> Path:
        out = run.stage_dir(stage) / "student"
        if not run.finished(stage):
            t0 = time.perf_counter()
            spec = run.spec(stage, "sft", "sft", source, cfg.seed + SEED_OFFSET[stage], lora=cfg.stages.sft_lora,
                            groups=list(SFT_GROUPS), model_out=str(out))
            run.finish(stage, run.fit(spec), t0)
        return out

    # The teacher's pretraining and the student's chain (its pretraining, then the SFT-only
    # baseline) do not depend on each other: they run at the same time, each on its own worker.
    # Evaluations start as soon as their checkpoint exists and run beside the stages that follow.
    with ThreadPoolExecutor(max_workers=1) as background:
        teacher_future = background.submit(run.pretrained, "teacher", "pretrain_teacher")
        student_base_dir = run.pretrained("student", "pretrain_student")
        run.evaluate({"student_base": student_base_dir})
        if cfg.baseline_sft and "sft" in cfg.steps:
            run.evaluate({"student_sft_only": sft_stage("baseline_sft", student_base_dir)})
        teacher_dir = teacher_future.result()
    vocab = check_pair_paths(teacher_dir, student_base_dir)
    run.evaluate({"teacher": teacher_dir})

    # Step 1: the teacher's verb-FFNs train in a teacher actor while the student's train on Ray Train.
    step1 = run.stage_dir("verbalize")
    if "verbalize" in cfg.steps and not run.finished("verbalize"):
        t0 = time.perf_counter()
        pool = TeacherPool(cfg.teacher_pool, teacher_dir, None, cfg.signal.topk, cfg.loss.kd_temperature, vocab, cfg.signal.storage)
        teacher_job = pool.actors[0].train_verbalizers.remote(
            run.cfg_yaml, run.train_rows("verbalize"), str(step1 / "teacher_verbalizers"),
            cfg.seed + SEED_OFFSET["verbalize/teacher"])
        spec = run.spec("verbalize/student", "verbalize", "verbalize", student_base_dir,
                        cfg.seed + SEED_OFFSET["verbalize/student"], verbalizers_out=str(step1 / "student_verbalizers"))
        try:
            history = run.fit(spec)
            teacher_history = ray.get(teacher_job)
        finally:
            pool.shutdown()
        for record in teacher_history:
            run.writer.write(record)
        run.finish("verbalize", teacher_history + history, t0)
    elif not run.finished("verbalize"):  # step 1 skipped: untrained verb-FFNs (the logit lens at zero-init)
        for role, model_dir in (("teacher", teacher_dir), ("student", student_base_dir)):
            verbs = new_verbalizers(cfg, role, Backbone.from_pretrained(model_dir), cfg.seed + SEED_OFFSET[f"verbalize/{role}"])
            verbs.save(step1 / f"{role}_verbalizers")

    # Step 2: interaction, the teacher pool streaming compact signals to the student workers.
    step2 = run.stage_dir("interact")
    if "interact" in cfg.steps:
        if not run.finished("interact"):
            t0 = time.perf_counter()
            pool = None
            if cfg.teacher.source == "cache":  # no teacher actors: the workers read the cached signal
                teacher = open_cache(cfg, teacher_dir, student_base_dir, step1 / "teacher_verbalizers", vocab)
            else:
                pool = TeacherPool(cfg.teacher_pool, teacher_dir, step1 / "teacher_verbalizers", cfg.signal.topk,
                                   cfg.loss.kd_temperature, vocab, cfg.signal.storage,
                                   tail_samples=cfg.signal.tail_samples, seed=cfg.seed + SEED_OFFSET["interact"])
                step2.mkdir(parents=True, exist_ok=True)
                (step2 / "teacher_placement.json").write_text(json.dumps(pool.infos, indent=2))
                print(f"[interact] teacher replicas on {[(i['node_id'][:8], i['device']) for i in pool.infos]}", flush=True)
                teacher = TeacherClient(pool.actors, cfg.teacher_pool.lookahead)
            spec = run.spec("interact", "interact", "interact", student_base_dir, cfg.seed + SEED_OFFSET["interact"],
                            verbalizer_dir=str(step1 / "student_verbalizers"), lora=True, teacher=teacher, vocab=vocab,
                            model_out=str(step2 / "student"), verbalizers_out=str(step2 / "student_verbalizers"))
            try:
                history = run.fit(spec)
            finally:
                if pool is not None:
                    pool.shutdown()
            run.finish("interact", history, t0)
        run.evaluate({"vlsi_without_sft": step2 / "student"})

    if "sft" in cfg.steps:
        source = step2 / "student" if (step2 / STAGE_FILE).is_file() else student_base_dir
        run.evaluate({"vlsi": sft_stage("sft", source)})

    results = run.accuracy()
    report = {"run": cfg.name, "runner": "ray", "seconds": round(time.perf_counter() - started, 1), "accuracy": results,
              "skipped_rows": {k: v.skipped for k, v in run.splits.stats.items()}}
    write_report(run.dir, report)
    print(f"[done] report in {run.dir / 'report.md'} ({report['seconds']:.0f}s)", flush=True)
    return report
