"""The teacher as Ray actors: frozen backbone + verbalizers, answering batches with compact signals.

:class:`TeacherWorker` is a plain class (tested in-process); :class:`TeacherPool` turns it into
``replicas`` Ray actors placed by the config's resources, in a placement group, with restarts.
An actor loads its weights from paths in its constructor, so when Ray restarts a dead actor it
comes back as it was and the request that was in flight is retried (``max_task_retries``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from pathlib import Path
from signal import SIGKILL

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from vlsi_ray.config import config_from_yaml
from vlsi_ray.data.ray_dataset import RayCollate
from vlsi_ray.env import set_offline_defaults
from vlsi_ray.method.loop import Stepper, run_steps, to_device
from vlsi_ray.method.offload import OffloadStepper, local
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
    ``group`` (``rank``, ``world``, ``address``, ``port``): this worker is one rank of a tensor-parallel
    replica (:class:`TeacherGroup`); it joins the group and loads its shard; only rank 0 encodes answers.
    ``shard_verbalizers`` (``teacher_pool.shard_verbalizers``): such a rank holds its part of every verb-FFN
    (:meth:`Verbalizers.shard`) instead of all of them.

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
        group: dict | None = None,
        shard_verbalizers: bool = False,
    ):
        set_offline_defaults()
        self.kill_at_request = kill_at_request

        self.device = resolve_device(device)
        if isinstance(model_dir, list):
            model_dir = ray.get(model_dir[0])
        self.model_dir = str(model_dir)

        self.load = load or LoadSettings("teacher")
        self.rank, self.world = 0, 1
        self._mesh = None
        if group is not None:  # one rank of a tensor-parallel replica (TeacherGroup)
            self.rank, self.world = _join_group(group, self.device)
            self.backbone = load_model(model_dir, self.load, self.device, tensor_parallel=self.world)
        elif self.device.type == "cuda" and torch.cuda.device_count() > 1:
            # A replica given several GPUs (Ray sets CUDA_VISIBLE_DEVICES to them) spreads the teacher over all.
            self.backbone = load_model(model_dir, self.load, None, device_map="auto")
            self.device = self.backbone.device  # where inputs go: the first module's GPU
        else:
            self.backbone = load_model(model_dir, self.load, self.device)
        self.shard_verbalizers = shard_verbalizers and self.world > 1
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
        self.verbalizers = frozen_verbalizers(self._placed(verbalizers), self.backbone)
        return self.verbalizers.layers

    def _placed(self, verbalizers: Verbalizers) -> Verbalizers:
        """``verbalizers`` split over this replica's ranks with ``shard_verbalizers`` (else whole on each)."""
        if not self.shard_verbalizers:
            return verbalizers
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

            self._mesh = init_device_mesh(self.device.type, (self.world,))  # the replica's default group
        return verbalizers.shard(self._mesh)

    def info(self) -> dict:
        """Where this replica runs: pid, rank and group size, the LM head rows it holds, Ray node id,
        device and GPU ids (placement checks, fault tests)."""
        devices = sorted({str(p.device) for p in self.backbone.model.parameters()})
        head = self.backbone.lm_head.weight
        info = {
            "pid": os.getpid(),
            "rank": self.rank,
            "world": self.world,
            "lm_head_rows": int(local(head).shape[0]),  # this rank's shard
            "verbalizer_elements": None
            if self.verbalizers is None
            else sum(local(p).numel() for p in self.verbalizers.parameters()),  # this rank's part
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
        if arrival == self.kill_at_request and not (self.world == 1 and _restarted()):
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
        out = signal.to_numpy(self.storage) if self.rank == 0 else {}  # host work again; rank 0 answers for a group
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

    def train_verbalizers(
        self, cfg_yaml: str, dataset, total_steps: int, out_dir: str, seed: int, data_parallel: dict | None = None
    ) -> dict:
        """Step 1 on the teacher's side: train its verb-FFNs where the teacher lives; save to ``out_dir``.

        ``dataset``: the stage's train rows as a Ray Dataset in training order (``train_dataset``, as a
        Train worker reads its stage), read and collated here; ``total_steps`` optimizer steps.
        ``data_parallel`` (``rank``, ``world``, ``endpoints``: an address and port per tensor-parallel rank
        index, :meth:`TeacherPool.step1_data_parallel`): this replica is one of ``world`` training the
        same verb-FFNs at once; of each optimizer step's ``grad_accum`` micro-batches it takes every
        ``world``-th from ``rank`` on, and the replicas average their gradients before each update (all
        end with the same weights; replica 0 saves). The optimizer is ``teacher_pool.step1_optimizer``'s:
        AdamW on the device (:class:`Stepper`) or split over the replicas on the host
        (:class:`~vlsi_ray.method.offload.OffloadStepper`, which saves its float32 masters). Returns
        ``{"history": per-step metrics of this replica's micro-batches, "seconds": its duration}``.
        """
        started = time.perf_counter()
        cfg = config_from_yaml(cfg_yaml)
        opt = cfg.stages.verbalize
        verbs = self._placed(new_verbalizers(cfg, "teacher", self.backbone, seed))
        objective = VerbalizationObjective(self.backbone, verbs, cfg.loss.chunk_size)
        collate = RayCollate(make_collator(self.backbone, cfg))
        dp_rank, world, group = 0, 1, None
        if data_parallel is not None and int(data_parallel["world"]) > 1:
            dp_rank, world = int(data_parallel["rank"]), int(data_parallel["world"])
            address, port = data_parallel["endpoints"][self.rank]
            where = {"rank": dp_rank, "world": world, "address": address, "port": port}
            group = _replica_group(where, self.device, cfg.train.collective_timeout_s)
            opt = dataclasses.replace(opt, grad_accum=opt.grad_accum // world)
        rows = dataset.iter_batches(batch_size=opt.batch_size, batch_format="numpy", drop_last=True)
        batches = (collate(batch) for batch in itertools.islice(rows, dp_rank, None, world))  # this replica's share
        if cfg.teacher_pool.step1_optimizer == "zero2-offload":
            stepper = OffloadStepper(objective.parameters(), opt, objective.compute_dtype, group, dp_rank, world)
        else:
            # a replica's ranks compute the same gradients (whole verb-FFNs) or each its shard's: nothing to average
            # over them; over the replicas, the replica group's mean
            average = _group_mean(group, world) if group is not None else (_keep if self.world > 1 else None)
            stepper = Stepper(objective.parameters(), opt, objective.compute_dtype, average=average)
        history = run_steps("verbalize/teacher", objective, stepper, batches, opt, total_steps, self.device, modules=[verbs])
        masters = None
        if isinstance(stepper, OffloadStepper):  # the float32 masters, not the compute-dtype weights on the device
            names = [name for name, _ in verbs.named_parameters()]
            masters = dict(zip(names, stepper.master_weights()))
            del stepper  # its host state
        state = verbs.full_state_dict(masters)  # a collective over the replica's ranks when the verb-FFNs are split
        if self.rank == 0 and dp_rank == 0:  # every rank and replica trained the same verb-FFNs
            verbs.save(out_dir, state)
        self.verbalizers = frozen_verbalizers(verbs, self.backbone)
        return {"history": history, "seconds": time.perf_counter() - started}


def _keep(grads: list[torch.Tensor]) -> None:
    """Gradients kept as they are (a tensor-parallel replica training alone)."""


def _replica_group(group: dict, device: torch.device, timeout_s: float):
    """A process group of its own over the replicas (``group``: rank, world, address, port; a TCP store at the
    address, gloo on CPUs, NCCL on GPUs), apart from any default group this process is in."""
    import datetime  # noqa: PLC0415

    import torch.distributed as dist  # noqa: PLC0415

    rank, world = int(group["rank"]), int(group["world"])
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(group["address"], int(group["port"]), world, is_master=rank == 0, timeout=timeout)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def _group_mean(process_group, world: int):
    """``average(grads)``: the in-place mean of a list of gradients (their local parts: DTensor shards stay
    this rank's) over ``process_group`` of ``world`` replicas; one flat all-reduce per call."""

    def average(grads: list[torch.Tensor]) -> None:
        parts = [local(g) for g in grads]
        flat = torch.cat([g.reshape(-1) for g in parts])
        process_group.allreduce([flat]).wait()
        flat.div_(world)
        offset = 0
        for g in parts:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    return average


def _join_group(group: dict, device: torch.device) -> tuple[int, int]:
    """Join this process to its tensor-parallel group (``group``: rank, world, address, port); NCCL on
    GPUs, gloo on CPUs. Returns ``(rank, world)``."""
    import torch.distributed as dist  # noqa: PLC0415

    rank, world = int(group["rank"]), int(group["world"])
    # transformers reads these when it builds its device mesh; Ray gives each rank one visible GPU
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{group['address']}:{group['port']}",
        rank=rank,
        world_size=world,
    )
    return rank, world


def _restarted() -> bool:
    """Whether Ray restarted this actor (False outside Ray)."""
    try:
        return ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # not inside a Ray actor
        return False


@ray.remote(num_cpus=0)
def _endpoint() -> tuple[str, int]:
    """An address and a free port on the node this task runs on (a group's rendezvous)."""
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


#: After one rank of a group fails, seconds to wait for the others' outcome (a dead rank's shows at once).
PEER_OUTCOME_WAIT_S = 60.0


def _rank0_result(refs: list):
    """Rank 0's result of one call on every rank of a group.

    Raises ``RayActorError`` as soon as a rank's process is found dead, even while its peers wait in
    a collective or fail in one (a peer's lost connection is not the cause); otherwise the first
    error a rank raised.
    """
    pending, first_error = list(refs), None
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=None if first_error is None else PEER_OUTCOME_WAIT_S)
        if not done:
            break
        try:
            ray.get(done)
        except RayActorError:
            raise
        except RayError as error:
            first_error = first_error or error
    if first_error is not None:
        raise first_error
    return ray.get(refs[0])


class TeacherGroup:
    """One tensor-parallel teacher replica: ``world`` :class:`TeacherWorker` ranks joined by
    ``torch.distributed``, rank ``i`` on bundle ``i`` of ``placement_group``, behind one actor.

    It answers like a single replica (:meth:`signal`, :meth:`info`, :meth:`busy`,
    :meth:`load_verbalizers`, :meth:`train_verbalizers`): every call goes to every rank, in the same
    order (the collectives of a forward must match), and rank 0's answer is returned. A rank that
    dies leaves its peers waiting in a collective, so the group restarts whole: the ranks are killed,
    new ones join a new rendezvous (loading from disk, as a restarted replica does) and the call is
    retried, up to ``max_task_retries`` times (-1: without limit). ``worker_kwargs`` are
    :class:`TeacherWorker`'s arguments; ``kill_at_request`` (a drill) goes to the last rank of the
    first generation only.
    """

    def __init__(
        self,
        worker_args: tuple,
        worker_kwargs: dict,
        world: int,
        rank_options: dict,
        placement_group,
        max_task_retries: int = 3,
    ):
        self.worker_args, self.worker_kwargs = worker_args, dict(worker_kwargs)
        drill = self.worker_kwargs.pop("kill_at_request", 0)
        self.kill_at_request = 0 if _restarted() else drill  # a restarted group's ranks are never killed again
        self.world, self.rank_options = world, rank_options
        self.placement_group = placement_group
        self.max_task_retries = max_task_retries
        self.generation = -1
        self.ranks: list = []
        self._lock = threading.Lock()  # submissions in one order to every rank; one restart at a time
        self._start()

    def _start(self) -> None:
        """Start a new generation of ranks (the caller holds the lock or is the constructor)."""
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        self.generation += 1
        where = lambda i: PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i)  # noqa: E731
        address, port = ray.get(_endpoint.options(scheduling_strategy=where(0)).remote())
        actor_cls = ray.remote(TeacherWorker)
        self.ranks = [
            actor_cls.options(
                **self.rank_options, max_restarts=0, max_task_retries=0, max_concurrency=1, scheduling_strategy=where(i)
            ).remote(
                *self.worker_args,
                **self.worker_kwargs,
                kill_at_request=self.kill_at_request if self.generation == 0 and i == self.world - 1 else 0,
                group={"rank": i, "world": self.world, "address": address, "port": port},
            )
            for i in range(self.world)
        ]

    def _on_every_rank(self, method: str, *args):
        """``method(*args)`` on every rank; rank 0's result. Restarts the group and retries when a rank dies."""
        attempt = 0
        while True:
            with self._lock:
                generation = self.generation
                refs = [getattr(rank, method).remote(*args) for rank in self.ranks]
            try:
                return _rank0_result(refs)
            except RayActorError:
                if self.max_task_retries != -1 and attempt >= self.max_task_retries:
                    raise
                attempt += 1
                self._restart(generation, "a rank died")
            except RayError:
                # a rank raised: its peers may wait in a collective for good; restart them, do not retry the call
                self._restart(generation, "a rank raised")
                raise

    def _restart(self, generation: int, why: str) -> None:
        """Start a new generation unless ``generation`` was already replaced (by the other call in flight)."""
        with self._lock:
            if self.generation == generation:
                print(f"teacher group: {why}; restarting all {self.world} ranks (generation {generation + 1})", flush=True)
                self._start()

    def signal(self, batch: dict) -> dict:
        """:meth:`TeacherWorker.signal` of the group (rank 0's arrays)."""
        return self._on_every_rank("signal", batch)

    def load_verbalizers(self, path: str, after=None) -> list[int]:
        """:meth:`TeacherWorker.load_verbalizers` on every rank."""
        return self._on_every_rank("load_verbalizers", path)

    def train_verbalizers(
        self, cfg_yaml: str, dataset, total_steps: int, out_dir: str, seed: int, data_parallel: dict | None = None
    ) -> dict:
        """:meth:`TeacherWorker.train_verbalizers` on every rank (the same rows; rank 0 saves). With
        ``data_parallel``, rank ``i`` averages its gradients with rank ``i`` of the other replicas (not
        retried: the other replicas' ranks wait on this group's)."""
        if data_parallel is None:
            return self._on_every_rank("train_verbalizers", cfg_yaml, dataset, total_steps, out_dir, seed)
        with self._lock:
            refs = [
                rank.train_verbalizers.remote(cfg_yaml, dataset, total_steps, out_dir, seed, data_parallel) for rank in self.ranks
            ]
        return _rank0_result(refs)  # a failure fails the step: its peers in the other replicas wait on this group

    def busy(self) -> dict:
        """Rank 0's :meth:`TeacherWorker.busy`."""
        return ray.get(self.ranks[0].busy.remote())

    def info(self) -> dict:
        """Rank 0's :meth:`TeacherWorker.info`, with every rank's pid and the group's generation."""
        infos = ray.get([rank.info.remote() for rank in self.ranks])
        return {
            **infos[0],
            "rank_pids": [i["pid"] for i in infos],
            "generation": self.generation,
            "gpu_ids": sorted({g for i in infos for g in i.get("gpu_ids", [])}),
        }


class TeacherPool:
    """``replicas`` :class:`TeacherWorker` actors in one placement group, restarted by Ray on failure;
    with ``tensor_parallel`` > 1, ``replicas`` :class:`TeacherGroup` actors of that many ranks each.

    Verbalizers are a constructor argument (``verbalizer_dir``, or ``step1_dir`` for a pool that
    trains them first), so that a restarted replica has them; so are ``tail_samples``, ``seed`` and
    the ``load`` settings (:class:`TeacherWorker`).
    Each replica asks for ``resources`` (CPUs, GPUs, custom resources such as ``teacher_node``); the
    placement group keeps the pool together (PACK) or apart (SPREAD) as configured. A tensor-parallel
    replica's ranks get a share each, one bundle per rank, in a placement group of the replica's own
    on one node (STRICT_PACK).
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
        res, tp = pool_cfg.resources, pool_cfg.tensor_parallel
        self.tensor_parallel = tp
        # a bundle per replica; or per rank of a tensor-parallel replica (its share of the replica's resources),
        # each replica's ranks in a placement group of their own, on one node (STRICT_PACK: NVLink between them)
        share = {
            "num_cpus": res.num_cpus / tp,
            "num_gpus": res.num_gpus / tp,
            "resources": {k: v / tp for k, v in res.resources.items()},
        }
        bundle = {"CPU": share["num_cpus"], **({"GPU": share["num_gpus"]} if res.num_gpus else {}), **share["resources"]}
        if tp == 1:
            self.placement_groups = [
                placement_group([dict(bundle) for _ in range(pool_cfg.replicas)], strategy=pool_cfg.placement_strategy)
            ]
        else:
            self.placement_groups = [
                placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK") for _ in range(pool_cfg.replicas)
            ]
        if not all(pg.wait(timeout_seconds=pool_cfg.placement_timeout_s) for pg in self.placement_groups):
            for pg in self.placement_groups:
                remove_placement_group(pg)
            where = f"{tp} ranks of {bundle} on one node each" if tp > 1 else f"{bundle} each"
            raise RuntimeError(
                f"the cluster could not place {pool_cfg.replicas} teacher replica(s) of {where} within "
                f"teacher_pool.placement_timeout_s={pool_cfg.placement_timeout_s:g}; lower teacher_pool.resources, add nodes "
                "or wait longer for the autoscaler."
            )
        model_arg = [model_dir] if isinstance(model_dir, ray.ObjectRef) else str(model_dir)  # nested: resolved in the replica
        args = (model_arg, None if verbalizer_dir is None else str(verbalizer_dir), topk, temperature, vocab_size, storage)
        kwargs = {
            "tail_samples": tail_samples,
            "seed": seed,
            "step1_dir": None if step1_dir is None else str(step1_dir),
            "load": load,
            "kill_at_request": pool_cfg.kill_at_request,
            "shard_verbalizers": pool_cfg.shard_verbalizers,
        }
        options = {"num_cpus": share["num_cpus"], "num_gpus": share["num_gpus"], "resources": share["resources"] or None}
        if tp > 1:  # a replica is a TeacherGroup: it places, restarts and calls its ranks
            group_cls = ray.remote(TeacherGroup)
            self.actors = [
                group_cls.options(num_cpus=0, max_restarts=pool_cfg.max_restarts, max_task_retries=0, max_concurrency=2).remote(
                    args, kwargs, tp, options, pg, pool_cfg.max_task_retries
                )
                for pg in self.placement_groups
            ]
        else:
            actor_cls = ray.remote(TeacherWorker)
            self.actors = [
                actor_cls.options(
                    **options,
                    max_restarts=pool_cfg.max_restarts,
                    max_task_retries=pool_cfg.max_task_retries,
                    max_concurrency=2 if pool_cfg.overlap_host_work else 1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.placement_groups[0], placement_group_bundle_index=i
                    ),
                ).remote(*args, **kwargs)
                for i in range(pool_cfg.replicas)
            ]
        self._infos: list[dict] | None = None
        self._shut = False

    def step1_data_parallel(self) -> list[dict]:
        """``data_parallel`` arguments of :meth:`TeacherWorker.train_verbalizers` for every replica: one
        rendezvous on replica 0's node per rank index (a tensor-parallel replica's rank ``i`` averages
        with rank ``i`` of the others)."""
        tp = len(self.placement_groups[0].bundle_specs) if self.tensor_parallel > 1 else 1
        endpoints = [
            ray.get(
                _endpoint.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_groups[0], placement_group_bundle_index=i)
                ).remote()
            )
            for i in range(tp)
        ]
        return [{"rank": r, "world": len(self.actors), "endpoints": endpoints} for r in range(len(self.actors))]

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
        for pg in self.placement_groups:
            remove_placement_group(pg)
