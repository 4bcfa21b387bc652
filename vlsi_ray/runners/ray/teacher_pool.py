"""The teacher as Ray actors: frozen backbone + verbalizers, answering batches with compact signals.

:class:`TeacherWorker` is a plain class (tested in-process); :class:`TeacherPool` turns it into
``replicas`` Ray actors placed by the config's resources, in a placement group, with restarts.
An actor loads its weights from paths in its constructor, so when Ray restarts a dead actor it
comes back as it was and the request that was in flight is retried (``max_task_retries``).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from signal import SIGKILL

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from vlsi_ray.config import config_from_yaml
from vlsi_ray.data.ray_dataset import RayCollate
from vlsi_ray.env import set_offline_defaults
from vlsi_ray.method.loop import Stepper, run_steps, to_device
from vlsi_ray.method.steps import VerbalizationObjective
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.prepare import LoadSettings, frozen_verbalizers, load_model, make_collator, new_verbalizers, resolve_device
from vlsi_ray.runners.ray.wire import decode_batch
from vlsi_ray.signals.produce import teacher_signal

#: What :meth:`TeacherWorker.signal` adds to the signal's arrays: the rows, the forward's seconds, the answering pid.
ENVELOPE = ("ids", "seconds", "pid")


#: ``kill_at_request``: seconds the replica lets the previous answers leave before it kills itself.
KILL_GRACE_S = 0.5


class TeacherWorker:
    """One teacher replica: the frozen teacher and its verbalizers on this process's device.

    ``model_dir`` is a ``save_pretrained`` directory, or a one-element list holding the ObjectRef
    of one (a teacher still training: Ray passes nested refs unresolved, so the replica starts now
    and waits for it here; a restarted replica resolves it again); ``verbalizer_dir`` (optional until step 2)
    one written by :meth:`Verbalizers.save`. ``signal`` options: ``topk`` (None = dense, a debug
    option), ``temperature``, ``vocab_size`` (shared vocab prefix), ``storage`` (wire dtype),
    ``tail_samples`` and the ``seed`` their draw is seeded from, with each row's id (see
    :func:`vlsi_ray.method.steps.teacher_signal`: a restarted replica sends the same samples).
    ``step1_dir`` is where step 1 saves the teacher's verbalizers when this replica trains them or
    waits for them (:meth:`train_verbalizers`, :meth:`load_verbalizers`): a replica restarted after
    that loads them from there. ``load``: the run's :class:`~vlsi_ray.prepare.LoadSettings` for the
    teacher (compute dtype, attention kernel, image resolution); default: the checkpoint as saved.
    ``kill_at_request`` (fault injection, ``teacher_pool.kill_at_request``): a replica that Ray never
    restarted kills its own process (SIGKILL) when this request arrives, once the earlier ones are answered.

    Created with ``max_concurrency=2`` (``teacher_pool.overlap_host_work``), a replica works on two
    requests at once: one holds the device for its forward (a lock lets one forward run at a time)
    while the other decodes its batch or encodes its signal. Host↔device copies are issued on the
    device's default stream, so on a GPU they wait for the forward in flight: what overlaps there is
    the host-side work. :meth:`busy` reports the forwards' share of the replica's time.
    """

    def __init__(
        self,
        model_dir: str | list,
        verbalizer_dir: str | None = None,
        topk: int | None = 64,
        temperature: float = 1.0,
        vocab_size: int | None = None,
        storage: str = "float16",
        device: str = "auto",
        *,
        tail_samples: int = 0,
        seed: int = 0,
        step1_dir: str | None = None,
        load=None,
        kill_at_request: int = 0,
    ):
        set_offline_defaults()
        self.kill_at_request = kill_at_request

        self.device = resolve_device(device)
        if isinstance(model_dir, list):
            model_dir = ray.get(model_dir[0])
        self.model_dir = str(model_dir)

        self.load = load or LoadSettings("teacher")
        if self.device.type == "cuda" and torch.cuda.device_count() > 1:
            # A replica given several GPUs (Ray sets CUDA_VISIBLE_DEVICES to them) spreads the teacher over all.
            self.backbone = load_model(model_dir, self.load, None, device_map="auto")
            self.device = self.backbone.device  # where inputs go: the first module's GPU
        else:
            self.backbone = load_model(model_dir, self.load, self.device)
        self.backbone.model.eval()
        for p in self.backbone.model.parameters():
            p.requires_grad_(False)
        self.verbalizers = None
        self.topk, self.temperature, self.vocab_size, self.storage = topk, temperature, vocab_size, storage
        self.tail_samples, self.seed = tail_samples, seed
        self.requests = 0
        self._arrivals = 0
        self._counter_lock = threading.Lock()  # request counts (two requests may arrive at once)
        self._device_lock = threading.Lock()  # one forward on the device at a time
        self._forward_seconds = 0.0
        self._first_started: float | None = None
        self._last_finished: float | None = None
        if verbalizer_dir is not None:
            self.load_verbalizers(verbalizer_dir)
        elif step1_dir is not None and (Path(step1_dir) / "verbalizers.json").is_file():
            self.load_verbalizers(step1_dir)

    def load_verbalizers(self, path: str, after=None) -> list[int]:
        """Load the teacher's verb-FFNs from ``path``; returns their target layers.

        ``after`` is ignored: pass the ObjectRef of another replica's :meth:`train_verbalizers` and
        Ray runs this call once that one has finished (and saved to ``path``).
        """
        verbalizers = Verbalizers.load(path, self.backbone.lm_head.weight.device)  # next to the heads they feed
        self.verbalizers = frozen_verbalizers(verbalizers, self.backbone)
        return self.verbalizers.layers

    def info(self) -> dict:
        """Where this replica runs: pid, Ray node id, device and GPU ids (placement checks, fault tests)."""
        devices = sorted({str(p.device) for p in self.backbone.model.parameters()})
        info = {
            "pid": os.getpid(),
            "device": str(self.device),
            "devices": devices,
            "model_dir": self.model_dir,
            "requests": self.requests,
        }
        try:
            ctx = ray.get_runtime_context()
            info.update(node_id=ctx.get_node_id(), gpu_ids=[str(g) for g in ray.get_gpu_ids()])
        except Exception:  # not inside Ray (unit tests)
            pass
        return info

    def signal(self, batch: dict) -> dict:
        """The teacher signal of one encoded batch (see :mod:`vlsi_ray.runners.ray.wire`).

        Returns :meth:`TeacherSignal.to_numpy`'s arrays (``t_l + 1`` layers × ``N`` response
        tokens; top-k log-probs, int32 ids, tail mass, tail samples if any) plus ``ids``, the
        forward's ``seconds`` (the time it held the device) and the answering process's ``pid``
        (logged per step: a restart shows).
        """
        if self.verbalizers is None:
            raise RuntimeError("the teacher has no verbalizers yet; run step 1 (verbalize) before step 2.")
        with self._counter_lock:
            self._arrivals += 1
            arrival = self._arrivals
        if arrival == self.kill_at_request and not _restarted():
            # As a replica taking one request at a time would die: after answering the requests before this one,
            # before starting any after it (the device lock keeps later ones from their forwards).
            self._device_lock.acquire()
            while self.requests < arrival - 1:
                time.sleep(0.01)
            time.sleep(KILL_GRACE_S)  # their answers leave this process (Ray replies after the method returns)
            print(f"teacher_pool.kill_at_request={self.kill_at_request}: killing this replica (pid {os.getpid()})", flush=True)
            os.kill(os.getpid(), SIGKILL)
        if self._first_started is None:
            self._first_started = time.perf_counter()
        tensors = to_device(decode_batch(batch), self.device)  # decoding: host work beside the other request's forward
        with self._device_lock:
            forward_started = time.perf_counter()
            signal = teacher_signal(
                self.backbone,
                self.verbalizers,
                tensors,
                self.topk,
                self.temperature,
                self.vocab_size,
                tail_samples=self.tail_samples,
                seed=self.seed,
            )
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the forward's share ends with its kernels
            forward = time.perf_counter() - forward_started
        out = signal.to_numpy(self.storage)  # host work again
        finished = time.perf_counter()
        with self._counter_lock:
            self.requests += 1
            self._forward_seconds += forward
            self._last_finished = finished
        out["ids"] = list(batch["ids"])
        out["seconds"] = np.array(forward)  # the forward alone (with overlap, the call also waits for the device)
        out["pid"] = os.getpid()
        return out

    def busy(self) -> dict:
        """``{"requests", "forward_s", "span_s", "busy"}``: requests answered, seconds the forwards held the device,
        seconds from the first request's arrival to the last answer, and ``forward_s / span_s``."""
        span = 0.0 if self._first_started is None or self._last_finished is None else self._last_finished - self._first_started
        return {
            "requests": self.requests,
            "forward_s": self._forward_seconds,
            "span_s": span,
            "busy": self._forward_seconds / span if span > 0 else 0.0,
        }

    def train_verbalizers(self, cfg_yaml: str, dataset, total_steps: int, out_dir: str, seed: int) -> dict:
        """Step 1 on the teacher's side: train its verb-FFNs where the teacher lives; save to ``out_dir``.

        ``dataset``: the stage's train rows as a Ray Dataset in training order (``train_dataset``, as a
        Train worker reads its stage), read and collated here; ``total_steps`` optimizer steps. Returns
        ``{"history": per-step metrics, "seconds": its duration}``.
        """
        started = time.perf_counter()
        cfg = config_from_yaml(cfg_yaml)
        opt = cfg.stages.verbalize
        verbs = new_verbalizers(cfg, "teacher", self.backbone, seed)
        objective = VerbalizationObjective(self.backbone, verbs, cfg.loss.chunk_size)
        collate = RayCollate(make_collator(self.backbone, cfg))
        batches = iter(dataset.iter_torch_batches(batch_size=opt.batch_size, collate_fn=collate, drop_last=True))
        stepper = Stepper(objective.parameters(), opt, objective.compute_dtype)
        history = run_steps("verbalize/teacher", objective, stepper, batches, opt, total_steps, self.device, modules=[verbs])
        verbs.save(out_dir)
        self.verbalizers = frozen_verbalizers(verbs, self.backbone)
        return {"history": history, "seconds": time.perf_counter() - started}


def _restarted() -> bool:
    """Whether Ray restarted this actor (False outside Ray)."""
    try:
        return ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # not inside a Ray actor
        return False


class TeacherPool:
    """``replicas`` :class:`TeacherWorker` actors in one placement group, restarted by Ray on failure.

    Verbalizers are a constructor argument (``verbalizer_dir``, or ``step1_dir`` for a pool that
    trains them first), so that a restarted replica has them; so are ``tail_samples``, ``seed`` and
    the ``load`` settings (:class:`TeacherWorker`).
    Each replica asks for ``resources`` (CPUs, GPUs, custom resources such as ``teacher_node``);
    the placement group keeps the pool together (PACK) or apart (SPREAD) as configured.
    ``model_dir`` may be the ObjectRef of the path (a teacher still pretraining): the replicas start
    at once and load the teacher when it resolves; calls made on them meanwhile wait in their queues.
    """

    def __init__(
        self,
        pool_cfg,
        model_dir,
        verbalizer_dir: str | Path | None,
        topk: int | None,
        temperature: float,
        vocab_size: int | None,
        storage: str,
        tail_samples: int = 0,
        seed: int = 0,
        step1_dir: str | Path | None = None,
        load=None,
    ):
        res = pool_cfg.resources
        bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {}), **res.resources}
        self.placement_group = placement_group(
            [dict(bundle) for _ in range(pool_cfg.replicas)], strategy=pool_cfg.placement_strategy, name=""
        )
        if not self.placement_group.wait(timeout_seconds=pool_cfg.placement_timeout_s):
            remove_placement_group(self.placement_group)
            raise RuntimeError(
                f"the cluster could not place {pool_cfg.replicas} teacher replica(s) of {bundle} within "
                f"teacher_pool.placement_timeout_s={pool_cfg.placement_timeout_s:g}; lower teacher_pool.resources, add nodes "
                "or wait longer for the autoscaler."
            )
        actor_cls = ray.remote(TeacherWorker)
        model_arg = [model_dir] if isinstance(model_dir, ray.ObjectRef) else str(model_dir)  # nested: resolved in the replica
        self.actors = [
            actor_cls.options(
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus,
                resources=dict(res.resources) or None,
                max_restarts=pool_cfg.max_restarts,
                max_task_retries=pool_cfg.max_task_retries,
                max_concurrency=2 if pool_cfg.overlap_host_work else 1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
            ).remote(
                model_arg,
                None if verbalizer_dir is None else str(verbalizer_dir),
                topk,
                temperature,
                vocab_size,
                storage,
                tail_samples=tail_samples,
                seed=seed,
                step1_dir=None if step1_dir is None else str(step1_dir),
                load=load,
                kill_at_request=pool_cfg.kill_at_request,
            )
            for i in range(pool_cfg.replicas)
        ]
        self._infos: list[dict] | None = None
        self._shut = False

    @property
    def infos(self) -> list[dict]:
        """Each replica's :meth:`TeacherWorker.info` (waits for the replicas to be up)."""
        if self._infos is None:
            self._infos = ray.get([a.info.remote() for a in self.actors])
        return self._infos

    def shutdown(self) -> None:
        """Kill the actors and free the placement group (once; later calls do nothing)."""
        if self._shut:
            return
        self._shut = True
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement_group)
