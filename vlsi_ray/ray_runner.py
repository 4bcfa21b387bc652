"""The Ray runner: teacher actors, the student on Ray Train fed by Ray Data, evaluation as Ray tasks.

Same recipe as :mod:`vlsi_ray.runner` (setup → stages → evaluate → report), same objectives, same
seeds and batch order, so with one worker it reproduces the in-process run. Each student stage is
one ``TorchTrainer`` run whose storage is ``<run_dir>/ray_train/<stage>``: re-running the same
command skips finished stages (``stage.json``) and resumes an interrupted one from its last
checkpoint. The teacher lives in Ray actors: a teacher pool trains its verbalizers (step 1) and
then answers step 2. The tiny demo models are pretrained in Ray tasks.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
from vlsi_ray.runner import SEED_OFFSET, STAGE_FILE, Run
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
    runtime_env: dict = {"env_vars": ray_env()}
    # A local Ray is one machine that nobody drains: Ray Train's preemption watcher (one more actor
    # process per Train run) has nothing to watch.
    runtime_env["env_vars"].setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
                                       os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"))
    if not cfg.ray.include_dashboard:
        def quiet_placement_group_cleaner() -> None:  # nested: cloudpickle ships it by value to every worker
            import logging

            # Without the dashboard there is no State API: Ray Train's placement-group cleaner then
            # warns once a second per Train run that it cannot query the controller.
            logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)

        runtime_env["worker_process_setup_hook"] = quiet_placement_group_cleaner
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=cfg.ray.include_dashboard,
             runtime_env=runtime_env)
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
        """Pretrain a tiny model in one Ray task with the in-process runner's loop (same weights as
        ``runner=local``), placed like the role's actors: ``teacher_pool.resources`` or
        ``train.resources_per_worker``. Pretraining only bootstraps the tiny demo models; a Ray
        Train run's start-up (~45 s on 2 cores) is not worth it for them."""
        import ray

        init = self.dir / "ray_train" / f"{stage}-init"
        backbone.save_pretrained(init)
        if role == "teacher":
            res = self.cfg.teacher_pool.resources
            gpus = res.num_gpus
        else:  # as a Train worker would be placed
            res = self.cfg.train.resources_per_worker
            gpus = (res.num_gpus or 1) if self.use_gpu else 0
        task = ray.remote(_pretrain_task).options(num_cpus=res.num_cpus, num_gpus=gpus, resources=dict(res.resources) or None)
        return ray.get(task.remote(self.cfg_yaml, role, stage, str(init), self.train_rows(stage),
                                   str(self.dir / "metrics.jsonl"), str(target)))

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


def _pretrain_task(cfg_yaml: str, role: str, stage: str, init_dir: str, rows: list[dict], metrics_path: str,
                   target: str) -> list[dict]:
    """:func:`vlsi_ray.runner.pretrain_tiny` as a Ray task: the model at ``init_dir`` trained on ``rows``, saved to ``target``."""
    from vlsi_ray.config import config_from_yaml
    from vlsi_ray.env import set_offline_defaults
    from vlsi_ray.metrics import MetricsWriter
    from vlsi_ray.prepare import resolve_device
    from vlsi_ray.runner import pretrain_tiny

    set_offline_defaults()
    cfg = config_from_yaml(cfg_yaml)
    device = resolve_device(cfg.device)
    backbone = Backbone.from_pretrained(init_dir, device=device)
    return pretrain_tiny(cfg, role, stage, backbone, rows, device, MetricsWriter(metrics_path), Path(target))


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

    # The teacher's pretraining and the student's chain (its pretraining, the SFT-only baseline and
    # its side of step 1) do not depend on each other: they run at the same time. Evaluations start
    # as soon as their checkpoint exists and run beside the stages that follow.
    step1, step2 = run.stage_dir("verbalize"), run.stage_dir("interact")
    train_step1 = "verbalize" in cfg.steps and not run.finished("verbalize")
    with ThreadPoolExecutor(max_workers=1) as background:
        teacher_future = background.submit(run.pretrained, "teacher", "pretrain_teacher")
        student_base_dir = run.pretrained("student", "pretrain_student")
        run.evaluate({"student_base": student_base_dir})
        if cfg.baseline_sft and "sft" in cfg.steps:
            run.evaluate({"student_sft_only": sft_stage("baseline_sft", student_base_dir)})
        student_step1: list[dict] = []
        if train_step1:  # the student's verb-FFNs need only the student: trained while the teacher pretrains
            spec = run.spec("verbalize/student", "verbalize", "verbalize", student_base_dir,
                            cfg.seed + SEED_OFFSET["verbalize/student"], verbalizers_out=str(step1 / "student_verbalizers"))
            student_step1 = _last_run(read_metrics(run.dir / "metrics.jsonl", spec.stage))
            finished = student_step1 and student_step1[-1]["step"] == spec.total_steps
            if not (finished and (step1 / "student_verbalizers" / "verbalizers.json").is_file()):  # else a rerun: done
                student_step1 = run.fit(spec)
        teacher_dir = teacher_future.result()
    vocab = check_pair_paths(teacher_dir, student_base_dir)
    run.evaluate({"teacher": teacher_dir})

    if "verbalize" not in cfg.steps and not run.finished("verbalize"):  # untrained verb-FFNs (the logit lens at zero-init)
        for role, model_dir in (("teacher", teacher_dir), ("student", student_base_dir)):
            verbs = new_verbalizers(cfg, role, Backbone.from_pretrained(model_dir), cfg.seed + SEED_OFFSET[f"verbalize/{role}"])
            verbs.save(step1 / f"{role}_verbalizers")

    # The teacher's side of step 1 and step 2 share one teacher pool: replica 0 trains the teacher's
    # verb-FFNs while step 2's workers start; their first requests wait in the replicas' queues until
    # the verbalizers are saved (the other replicas load them then).
    run_step2 = "interact" in cfg.steps and not run.finished("interact")
    live = run_step2 and cfg.teacher.source == "live"
    pool = teacher_job = bookkeeping = None
    if train_step1 or live:
        pool = TeacherPool(cfg.teacher_pool, teacher_dir, None, cfg.signal.topk, cfg.loss.kd_temperature, vocab,
                           cfg.signal.storage, tail_samples=cfg.signal.tail_samples,
                           seed=cfg.seed + SEED_OFFSET["interact"], step1_dir=step1 / "teacher_verbalizers")
    try:
        if train_step1:
            t0 = time.perf_counter()
            teacher_job = pool.actors[0].train_verbalizers.remote(
                run.cfg_yaml, run.train_rows("verbalize"), str(step1 / "teacher_verbalizers"),
                cfg.seed + SEED_OFFSET["verbalize/teacher"])
            for actor in pool.actors[1:]:
                actor.load_verbalizers.remote(str(step1 / "teacher_verbalizers"), teacher_job)

            def finish_step1() -> None:
                teacher_history = ray.get(teacher_job)
                for record in teacher_history:
                    run.writer.write(record)
                run.finish("verbalize", teacher_history + student_step1, t0)

            if live:  # step 1's bookkeeping waits for the teacher beside step 2
                bookkeeping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verbalize-bookkeeping")
                step1_done = bookkeeping.submit(finish_step1)
            else:
                finish_step1()

        # Step 2: interaction, the teacher pool (or the teacher cache) streaming compact signals to the student workers.
        if run_step2:
            t0 = time.perf_counter()
            if live:
                step2.mkdir(parents=True, exist_ok=True)
                (step2 / "teacher_placement.json").write_text(json.dumps(pool.infos, indent=2))
                print(f"[interact] teacher replicas on {[(i['node_id'][:8], i['device']) for i in pool.infos]}", flush=True)
                teacher = TeacherClient(pool.actors, cfg.teacher_pool.lookahead)
            else:  # no teacher actors: the workers read the cached signal
                teacher = open_cache(cfg, teacher_dir, student_base_dir, step1 / "teacher_verbalizers", vocab)
            spec = run.spec("interact", "interact", "interact", student_base_dir, cfg.seed + SEED_OFFSET["interact"],
                            verbalizer_dir=str(step1 / "student_verbalizers"), lora=True, teacher=teacher, vocab=vocab,
                            model_out=str(step2 / "student"), verbalizers_out=str(step2 / "student_verbalizers"))
            history = run.fit(spec)
            if bookkeeping is not None:
                step1_done.result()  # a failed teacher side of step 1 raises here
            run.finish("interact", history, t0)
    finally:
        if bookkeeping is not None:
            bookkeeping.shutdown(wait=True)
        if pool is not None:
            pool.shutdown()
    if "interact" in cfg.steps:
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
