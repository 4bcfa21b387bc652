"""The Ray runner: teacher actors, the student on Ray Train fed by Ray Data, evaluation as Ray tasks.

Same recipe as :mod:`vlsi_ray.runners.local` (setup → stages → evaluate → report), same objectives, same
seeds and batch order, so with one worker it reproduces the in-process run. The student's stages
run in order in one ``TorchTrainer`` run whose storage is ``<run_dir>/ray_train/student`` (with
``train.sft_workers``, the SFT stages in a second one, ``student_sft``, on more workers once the teacher
pool is gone): re-running the same command skips finished stages (``stage.json``) and resumes an
interrupted one from its last checkpoint. The teacher lives in Ray actors: a teacher pool trains its verbalizers
(step 1) and then answers step 2. The tiny demo models are pretrained in Ray tasks.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import ray
import ray.train
from ray.data import DataContext
from ray.train.torch import TorchConfig, TorchTrainer

from vlsi_ray import env as vlsi_env
from vlsi_ray.config import EVAL_MODELS, SFT_RUN_STAGES, RunConfig, config_from_yaml, to_yaml, with_absolute_model_paths
from vlsi_ray.data.index import measure_on_ray_or_here
from vlsi_ray.data.ray_dataset import train_dataset, train_split
from vlsi_ray.env import at_idle_priority, malloc_env, set_offline_defaults
from vlsi_ray.eval.heldout import heldout_report, score_rows, summary_line
from vlsi_ray.eval.report import write_report
from vlsi_ray.method.loop import total_optimizer_steps
from vlsi_ray.metrics import MetricsWriter, last_attempt, read_metrics, write_stage_summary
from vlsi_ray.models.backbone import ModelInfo
from vlsi_ray.prepare import (
    LoadSettings,
    check_pair_paths,
    check_tensor_parallel,
    load_model,
    make_collator,
    model_info,
    new_verbalizers,
    read_split_rows,
    require_data,
    resolve_device,
)
from vlsi_ray.recipe.layout import RunLayout
from vlsi_ray.recipe.stages import pretraining, stage
from vlsi_ray.runners.base import Run, pretrain_tiny
from vlsi_ray.runners.ray.teacher_pool import TeacherPool
from vlsi_ray.runners.ray.train_loop import StageSpec, dataset_name, train_student
from vlsi_ray.teacher.cache import require_cache
from vlsi_ray.teacher.sources import teacher_source


def ray_env(tune_malloc: bool = False) -> dict[str, str]:
    """Environment variables every actor and worker gets: the offline defaults and quieter Train logs,
    and with ``tune_malloc`` (``ray.tune_malloc``) :func:`vlsi_ray.env.malloc_env`'s allocator settings.

    ``DS_ACCELERATOR`` goes along only when the user set it: otherwise each worker picks its own
    (cuda where it sees a GPU), whatever the driver's machine has.
    """
    env = {
        k: os.environ[k]
        for k in (
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "WANDB_MODE",
            "WANDB_SILENT",
            "DS_ACCELERATOR",
            "TOKENIZERS_PARALLELISM",
            "TRANSFORMERS_VERBOSITY",
        )
        if k in os.environ and k not in vlsi_env.DEFAULTED  # read at call time: set_offline_defaults() fills it
    }
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # worker progress lines once, not twice
    if tune_malloc:
        env.update(malloc_env())
    return env


def local_runtime_env(tune_malloc: bool, include_dashboard: bool) -> dict:
    """The job runtime env of a local Ray the runner starts: :func:`ray_env`, no preemption watcher,
    and without the dashboard a hook that quiets Ray Train's placement-group cleaner."""
    runtime_env: dict = {"env_vars": ray_env(tune_malloc)}
    # A local Ray is one machine that nobody drains: Ray Train's preemption watcher (one more actor
    # process per Train run) has nothing to watch.
    runtime_env["env_vars"].setdefault(
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    )
    if not include_dashboard:

        def quiet_placement_group_cleaner() -> None:  # nested: cloudpickle ships it by value to every worker

            # Without the dashboard there is no State API: Ray Train's placement-group cleaner then
            # warns once a second per Train run that it cannot query the controller.
            logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)

        runtime_env["worker_process_setup_hook"] = quiet_placement_group_cleaner
    return runtime_env


def connect(cfg: RunConfig) -> str:
    """Join the cluster at ``ray.address`` (or ``RAY_ADDRESS``), else a Ray already running on this machine
    (e.g. ``ray start --head``; Ray's ``address="auto"``), else start a local Ray (``ray.num_cpus``/``num_gpus``);
    return which."""
    if ray.is_initialized():
        return "already connected"
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": ray_env(cfg.ray.tune_malloc)}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return f"cluster at {address}"
    try:  # a Ray already running on this machine
        ray.init(address="auto", runtime_env=runtime_env)
        return "the Ray cluster running on this machine"
    except ConnectionError:
        pass
    ray.init(
        address="local",
        num_cpus=cfg.ray.num_cpus,
        num_gpus=cfg.ray.num_gpus,
        include_dashboard=cfg.ray.include_dashboard,
        runtime_env=local_runtime_env(cfg.ray.tune_malloc, cfg.ray.include_dashboard),
    )
    return "local Ray"


def _data_context() -> None:
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the seeded order is the batch order
    ctx.enable_progress_bars = False


class RayRun(Run):
    """The Ray runner's state and phases: the student's stages as one Ray Train run, the teacher as a
    pool of actors, evaluations as Ray tasks. Every stage's properties come from the stage table."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        # Actors and workers run elsewhere (Train workers in their run directories): checkpoint paths go absolute.
        self.cfg = cfg = with_absolute_model_paths(cfg)
        self.cfg_yaml = to_yaml(cfg)
        self.layout = RunLayout(self.layout.root.resolve())  # workers and tasks may run anywhere in the cluster
        self._split = None
        self._evals: dict[str, list] = {}  # model name -> ObjectRefs of its test pass, one per slice
        self._eval_slices = None
        self._split_lock = threading.Lock()  # the teacher's and the student's pretraining start together
        self.use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
        # What this invocation still has to run, decided once before anything runs (stages finish meanwhile).
        self.trains_step1 = "verbalize" in cfg.steps and not self.layout.finished("verbalize")
        self.runs_step2 = "interact" in cfg.steps and not self.layout.finished("interact")
        self.live_teacher = self.runs_step2 and cfg.teacher.source == "live"  # step 2 with the teacher actors, not the cache
        self.pool: TeacherPool | None = None
        self.step1_calls: list = []  # the pool's step-1 calls; step 2's client sends nothing before they finish
        self.specs: list[StageSpec] = []
        self.watcher = StageWatcher()

    def split(self):
        """The validated train split on Ray Data, read once per run (every stage orders it its own way)."""
        with self._split_lock:
            if self._split is None:
                self._split = train_split(self.cfg.data.dir, self.index["train"].excluded(), self.cfg.data.sort_in_memory_mb)
        return self._split

    def spec(self, name: str, model_dir: Path, **kw) -> StageSpec:
        """The :class:`StageSpec` of student stage ``name`` (its row of the stage table) starting from ``model_dir``."""
        row = stage(name)
        opt = getattr(self.cfg.stages, row.settings)
        total = total_optimizer_steps(opt, len(self.train_ids(row.settings)), self.cfg.train.workers_for(name)[0])
        lora = row.lora or (row.objective == "sft" and self.cfg.stages.sft_lora)
        return StageSpec(
            stage=row,
            cfg_yaml=self.cfg_yaml,
            run_dir=str(self.layout.root),
            model_dir=str(model_dir),
            total_steps=total,
            lora=lora,
            **kw,
        )

    def fit(self, specs: list[StageSpec], run_name: str = "student") -> None:
        """Run the student ``specs`` in order as one Ray Train run (``<run_dir>/ray_train/<run_name>``),
        resuming from its last checkpoint; each finished stage leaves its marker. The specs share their
        workers (``train.workers_for``)."""
        _data_context()
        cfg = self.cfg
        workers, res = cfg.train.workers_for(specs[0].stage.name)
        datasets = {}
        for spec in specs:
            opt = getattr(cfg.stages, spec.stage.settings)
            datasets[dataset_name(spec.stage.name)] = train_dataset(
                self.split(),
                opt.tasks,
                spec.stage.seed(cfg.seed),
                opt.batch_size * workers,
                spec.total_steps * opt.grad_accum,
                self.train_ids(spec.stage.settings),
                **self.grouping(spec.stage.settings, workers),
                lengths_from_shards=not self.index["train"].measured,
            )
        per_worker = {"CPU": res.num_cpus, **res.resources}
        if self.use_gpu:
            per_worker["GPU"] = res.num_gpus or 1
        trainer = TorchTrainer(
            train_student,
            train_loop_config={"specs": specs},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=self.use_gpu, resources_per_worker=per_worker),
            torch_config=TorchConfig(backend="nccl" if self.use_gpu else "gloo", timeout_s=cfg.train.collective_timeout_s),
            datasets=datasets,
            # One worker reads whole datasets: no split coordinator (one actor process fewer per stage).
            dataset_config=ray.train.DataConfig(datasets_to_split="all" if workers > 1 else []),
            run_config=ray.train.RunConfig(
                name=run_name,
                storage_path=str(self.layout.ray_train),
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        print(f"[ray] student stages {[s.stage.name for s in specs]} in one Ray Train run on {workers} worker(s)", flush=True)
        trainer.fit()

    def pretrain(self, role: str) -> Path:
        return Path(ray.get(self.start_pretraining(role)[0]))

    def start_pretraining(self, role: str):
        """Start pretraining a tiny model in a Ray task with the in-process runner's loop (same weights as
        ``runner=local``); return the ObjectRef of its directory, and the directory of its initial
        weights (same config and tokenizer).

        The task is placed like the role's actors (``teacher_pool.resources`` or
        ``train.resources_per_worker``) and writes the model, its marker and the model-cache copy
        itself. Pretraining only bootstraps the tiny demo models: not worth a Train run's start-up.
        """
        name = pretraining(role).name
        init = self.layout.initial_model(name)
        self.init_model(role).save_pretrained(init)
        if role == "teacher":
            res = self.cfg.teacher_pool.resources
            gpus = res.num_gpus
        else:  # as a Train worker would be placed
            res = self.cfg.train.resources_per_worker
            gpus = (res.num_gpus or 1) if self.use_gpu else 0
        cache = self.model_cache(role)
        task = ray.remote(_pretrain_task).options(num_cpus=res.num_cpus, num_gpus=gpus, resources=dict(res.resources) or None)
        ref = task.remote(
            self.cfg_yaml,
            role,
            str(init),
            str(self.layout.metrics),
            str(self.layout.model(name)),
            None if cache is None else str(cache),
        )
        return ref, init

    def evaluate(self, named_dirs: dict) -> None:
        """Start the test pass of each checkpoint in ``eval_models`` as ``eval_tasks`` Ray tasks (one slice
        of the test split each) and return at once: the passes run while later stages train;
        :meth:`accuracy` collects them. A directory may be an ObjectRef (a model still training)."""
        named_dirs = {name: path for name, path in named_dirs.items() if name in self.cfg.eval_models}
        if not named_dirs:
            return
        if self._eval_slices is None:
            n = self.cfg.eval_tasks
            self._eval_slices = [
                [(split, ids[i * len(ids) // n : (i + 1) * len(ids) // n]) for split, ids in self.eval_ids()] for i in range(n)
            ]
        res = self.cfg.train.resources_per_worker
        task = ray.remote(_score_rows).options(num_cpus=res.num_cpus, num_gpus=(res.num_gpus or 1) if self.use_gpu else 0)
        letters = self.option_letters()
        for name, path in named_dirs.items():
            path = path if isinstance(path, ray.ObjectRef) else str(path)
            role = "teacher" if name == "teacher" else "student"
            self._evals[name] = [task.remote(path, self.cfg_yaml, part, letters, role) for part in self._eval_slices]

    def accuracy(self) -> dict[str, dict]:
        """Wait for every pass started by :meth:`evaluate`; return each model's held-out loss and accuracy."""
        results = {}
        for name in sorted(self._evals, key=EVAL_MODELS.index):  # the report's order
            results[name] = heldout_report([record for part in ray.get(self._evals[name]) for record in part])
            print(summary_line(name, results[name]), flush=True)
        return results

    # -- phases ------------------------------------------------------------------------------------
    def models(self) -> None:
        """Setup: the student base (pretrained now if tiny), the teacher (its directory, or the ObjectRef of
        the task still pretraining it), the weight-free pair check and the first test passes."""
        cfg = self.cfg
        if cfg.teacher.path and cfg.student.path:  # real checkpoints: refuse an incompatible pair before any training
            check_pair_paths(cfg.teacher.path, cfg.student.path, cfg)  # configs and tokenizers only: cheap on the head
        # teacher_dir: the teacher's directory, or the ObjectRef of it while it pretrains; its initial
        # weights have the same config and tokenizer (all the pair check reads).
        self.teacher_dir = teacher_config = self.reuse("teacher")
        if self.teacher_dir is None:
            self.teacher_dir, teacher_config = self.start_pretraining("teacher")
        self.student_dir = self.pretrained("student")
        self.vocab = check_pair_paths(teacher_config, self.student_dir, cfg)
        check_tensor_parallel(ModelInfo.from_pretrained(teacher_config), cfg.teacher_pool.tensor_parallel)
        self.collator = make_collator(model_info(self.student_dir, LoadSettings.of(cfg, "student")), cfg)
        self.index_data(self.student_dir)
        self.evaluate({"student_base": self.student_dir, "teacher": self.teacher_dir})

    def measure(self, files: Sequence[str]) -> pa.Table:
        return measure_on_ray_or_here(files, self.collator, self.cfg.data.measure_in_driver_mb)

    def resolved_teacher(self) -> Path:
        """The teacher's directory (waiting for its pretraining task, if it is still running)."""
        return Path(ray.get(self.teacher_dir)) if isinstance(self.teacher_dir, ray.ObjectRef) else self.teacher_dir

    def untrained_verbalizers(self) -> None:
        """Without step 1 in ``steps`` (and never run): both models' verb-FFNs at init (the logit lens at zero-init)."""
        if "verbalize" in self.cfg.steps or self.layout.finished("verbalize"):
            return
        for role, model_dir in (("teacher", self.resolved_teacher()), ("student", self.student_dir)):
            verbs = new_verbalizers(
                self.cfg, role, ModelInfo.from_pretrained(model_dir), stage(f"verbalize/{role}").seed(self.cfg.seed)
            )
            verbs.save(self.layout.verbalizers(role))

    def start_teacher_pool(self) -> None:
        """One teacher pool for the teacher's side of step 1 and for step 2: replica 0 trains the teacher's
        verb-FFNs, the others load them once saved; created on the teacher's ObjectRef if it still pretrains."""
        cfg = self.cfg
        if not (self.trains_step1 or self.live_teacher):
            return
        self.pool = TeacherPool(
            cfg.teacher_pool,
            self.teacher_dir,
            None,
            cfg.signal.topk,
            cfg.loss.kd_temperature,
            self.vocab,
            cfg.signal.storage,
            tail_samples=cfg.signal.tail_samples,
            seed=stage("interact").seed(cfg.seed),
            step1_dir=self.layout.verbalizers("teacher"),
            load=LoadSettings.of(cfg, "teacher"),
        )

    def queue(self, name: str, make_spec: Callable[[], StageSpec], after: Callable[[], None]) -> None:
        """Queue student stage ``name`` for the Train run unless it is finished; ``after`` runs once it is."""
        if not self.layout.finished(name):
            self.specs.append(make_spec())
        self.watcher.on(self.layout.marker(name), after)

    def queue_baseline(self) -> None:
        """The SFT-only baseline (same data and steps as step 3) from the student base."""
        if self.runs("baseline_sft"):
            self.queue(
                "baseline_sft",
                lambda: self.spec("baseline_sft", self.student_dir),
                lambda: self.evaluate({"student_sft_only": self.layout.model("baseline_sft")}),
            )

    def queue_step1(self) -> None:
        """Step 1: the teacher's side in the pool (data-parallel over its replicas, or replica 0), the
        student's in the Train run; the stage's marker and summary once both are done."""
        if not self.trains_step1:
            return
        cfg, out, row = self.cfg, self.layout.verbalizers("teacher"), stage("verbalize/teacher")
        opt, ids = cfg.stages.verbalize, self.train_ids("verbalize")
        total = total_optimizer_steps(opt, len(ids))  # one replica: the in-process runner's steps
        _data_context()
        rows = train_dataset(
            self.split(), opt.tasks, row.seed(cfg.seed), opt.batch_size, total * opt.grad_accum, ids,
            **self.grouping("verbalize"), lengths_from_shards=not self.index["train"].measured,
        )  # fmt: skip
        seed = row.seed(cfg.seed)
        if cfg.teacher_pool.step1_data_parallel and len(self.pool.actors) > 1:  # every replica trains a share
            groups = self.pool.step1_data_parallel()
            self.step1_calls = [
                actor.train_verbalizers.remote(self.cfg_yaml, rows, total, str(out), seed, group)
                for actor, group in zip(self.pool.actors, groups)
            ]
            teacher_job = self.step1_calls[0]
        else:  # replica 0 trains, the others load its verb-FFNs once saved
            teacher_job = self.pool.actors[0].train_verbalizers.remote(self.cfg_yaml, rows, total, str(out), seed)
            self.step1_calls = [teacher_job] + [
                actor.load_verbalizers.remote(str(out), teacher_job) for actor in self.pool.actors[1:]
            ]

        def finish_step1() -> None:  # both sides done: the teacher's history joins the student's
            teacher = ray.get(teacher_job)
            for record in teacher["history"]:
                self.writer.write(record)
            student = last_attempt(read_metrics(self.layout.metrics, "verbalize/student"))
            student_seconds = json.loads(self.layout.marker("verbalize/student").read_text())["seconds"]
            # seconds: both sides' training (they ran at different times, beside other work)
            write_stage_summary(
                self.layout.marker("verbalize"), "verbalize", teacher["history"] + student, teacher["seconds"] + student_seconds
            )
            if not self.live_teacher:
                self.pool.shutdown()

        self.queue("verbalize/student", lambda: self.spec("verbalize/student", self.student_dir), finish_step1)
        if self.runs_step2 and not self.live_teacher:  # the cache's spec names the teacher's step-1 verbalizers
            ray.get(teacher_job)

    def queue_step2(self) -> None:
        """Step 2 from the student base, against the teacher pool or the offline cache."""
        if "interact" not in self.cfg.steps:
            return

        def make_spec() -> StageSpec:
            teacher = teacher_source(
                self.cfg,
                self.layout,
                self.vocab,
                pool=self.pool if self.live_teacher else None,
                ready=self.step1_calls,
                teacher_dir=self.resolved_teacher(),
                student_dir=self.student_dir,
            )
            return self.spec(
                "interact",
                self.student_dir,
                verbalizer_dir=str(self.layout.verbalizers("student")),
                teacher=teacher,
                vocab=self.vocab,
            )

        def after() -> None:
            if self.live_teacher:
                self.layout.teacher_placement.write_text(json.dumps(self.pool.infos, indent=2))
                print(
                    f"[interact] teacher replicas were on {[(i['node_id'][:8], i['device']) for i in self.pool.infos]}",
                    flush=True,
                )
                self.pool.shutdown()
            self.evaluate({"vlsi_without_sft": self.layout.model("interact")})

        self.queue("interact", make_spec, after)

    def queue_step3(self) -> None:
        """Step 3 from step 2's student (or the student base when the run has no step 2)."""
        if not self.runs("sft"):
            return
        source = (
            self.layout.model("interact")
            if "interact" in self.cfg.steps or self.layout.finished("interact")
            else self.student_dir
        )
        self.queue("sft", lambda: self.spec("sft", source), lambda: self.evaluate({"vlsi": self.layout.model("sft")}))

    def train_student(self) -> None:
        """The queued stages as one Train run (with ``train.sft_workers``, the SFT stages in a second one once
        the first is done and the teacher pool gone); the watcher runs each stage's follow-up as its marker
        appears."""
        late = [s for s in self.specs if s.stage.name in SFT_RUN_STAGES] if self.cfg.train.sft_workers else []
        first = [s for s in self.specs if s not in late]
        self.watcher.last([s.done_path for s in late])
        self.watcher.start()
        if first:
            self.fit(first)
        if late:
            self.watcher.wait([s.done_path for s in first])  # step 2's follow-up shuts the teacher pool down
            if self.pool is not None:
                self.pool.shutdown()  # its GPUs go to the SFT workers
            self.fit(late, run_name="student_sft")
        self.watcher.finish()

    def close(self) -> None:
        """Stop the watcher and free the teacher pool (also after a failure)."""
        self.watcher.stop()
        if self.pool is not None:
            self.pool.shutdown()

    def report(self, started: float) -> dict:
        """Wait for the teacher (a run without teacher stages still saves it) and every test pass; write the report."""
        self.resolved_teacher()
        results = self.accuracy()
        report = {
            "run": self.cfg.name,
            "runner": "ray",
            "seconds": round(time.perf_counter() - started, 1),
            "accuracy": results,
            "skipped_rows": self.skipped_rows(),
        }
        write_report(self.layout.root, report)
        print(f"[done] report in {self.layout.report_md} ({report['seconds']:.0f}s)", flush=True)
        return report


def _pretrain_task(cfg_yaml: str, role: str, init_dir: str, metrics_path: str, target: str, cache: str | None) -> str:
    """:func:`vlsi_ray.runners.local.pretrain_tiny` as a Ray task: the model at ``init_dir`` trained on its
    pretraining rows (read here), saved to ``target`` (and ``cache``); returns ``target``."""
    set_offline_defaults()
    cfg = config_from_yaml(cfg_yaml)
    device = resolve_device(cfg.device)
    backbone = load_model(init_dir, LoadSettings.of(cfg, role), device)
    name = pretraining(role).name
    rows = read_split_rows(cfg, "train", tasks=getattr(cfg.stages, name).tasks)
    writer = MetricsWriter(metrics_path)
    return str(pretrain_tiny(cfg, role, backbone, rows, device, writer, Path(target), None if cache is None else Path(cache)))


def _score_rows(
    model_dir: str, cfg_yaml: str, part: list[tuple[str, list[str]]], letters: str, role: str = "student"
) -> list[dict]:
    """:func:`~vlsi_ray.eval.heldout.score_rows` records of the checkpoint at ``model_dir`` (loaded with
    ``role``'s settings) on the held-out rows ``part`` (``(split, ids)`` pairs; a Ray task: the rows are
    read here), computed at idle CPU priority unless ``eval_priority=normal``: the pass runs beside later stages."""
    set_offline_defaults()
    cfg = config_from_yaml(cfg_yaml)
    device = resolve_device(cfg.device)
    rows = []
    for split, ids in part:
        by_id = {row["id"]: row for row in read_split_rows(cfg, split, ids=ids)}
        rows += [by_id[i] for i in ids]

    def score() -> list[dict]:
        backbone = load_model(model_dir, LoadSettings.of(cfg, role), device)
        return score_rows(backbone, rows, make_collator(backbone, cfg), cfg.eval_batch_size, device, letters)

    return at_idle_priority(score) if cfg.eval_priority == "idle" else score()


class StageWatcher:
    """Runs a callback once a stage's summary file appears: evaluations and clean-ups of the stages of
    a Train run that is still going. One thread polls the files in the order they were registered."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.pending: list[tuple[Path, Callable[[], None]]] = []
        self.error: BaseException | None = None
        self._done: set[Path] = set()  # paths whose callback has run
        self._final = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stage-watcher", daemon=True)

    def on(self, done_path: str | Path, callback: Callable[[], None]) -> None:
        """Call ``callback`` once ``done_path`` exists (at once if it does already)."""
        self.pending.append((Path(done_path), callback))

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while self.pending and not self._stop.is_set():
            path, callback = self.pending[0]
            if not path.is_file():
                if self._final.is_set():
                    self.error = RuntimeError(f"the Train run ended without writing {path}; see its log above.")
                    return
                self._stop.wait(self.interval)
                continue
            self.pending.pop(0)
            try:
                callback()
            except BaseException as err:  # re-raised in the driver by finish()
                self.error = err
                return
            self._done.add(path)

    def last(self, paths: Sequence[str | Path]) -> None:
        """Move the callbacks of ``paths`` after every other (a later Train run writes them)."""
        late = {Path(p) for p in paths}
        self.pending.sort(key=lambda item: item[0] in late)

    def wait(self, paths: Sequence[str | Path]) -> None:
        """Block until the callbacks registered for ``paths`` have run; raise the watcher's error, if any."""
        wanted = {Path(p) for p in paths} & ({p for p, _ in self.pending} | self._done)
        while wanted - self._done and self.error is None and self._thread.is_alive():
            time.sleep(self.interval)
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """After the Train run: run the callbacks still due, then raise the first error, if any."""
        self._final.set()
        self._thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Stop polling (the run failed); callbacks not yet run are dropped. Does not wait for one in
        progress (it may be waiting on the teacher): the thread is a daemon."""
        self._stop.set()


def run_ray(cfg: RunConfig) -> dict:
    """Run every stage in ``cfg.steps`` on Ray (joining or starting a cluster) and return the report dict.

    The teacher pretrains in a Ray task while the student pretrains in another; the student's stages
    then run as one Train run (:meth:`RayRun.fit`) while the teacher finishes: its pool is created
    on the ObjectRef of the teacher's directory, so its replicas load the teacher, and step 1's
    teacher side runs, as soon as the teacher is saved; step 2's client holds its first request
    until then.
    """
    started = time.perf_counter()
    require_data(cfg)  # before any Ray work
    require_cache(cfg)
    where = connect(cfg)
    print(f"[ray] {where}: {ray.cluster_resources()}", flush=True)
    run = RayRun(cfg)
    run.models()
    run.untrained_verbalizers()
    try:
        run.start_teacher_pool()
        run.queue_baseline()
        run.queue_step1()
        run.queue_step2()
        run.queue_step3()
        run.train_student()
    finally:
        run.close()
    return run.report(started)
