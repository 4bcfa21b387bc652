"""The student's view of the teacher pool: a callable ``batch -> TeacherSignal`` that hides Ray.

:class:`InteractionObjective` calls the client exactly as it calls a local teacher. The client
pipelines: :meth:`TeacherClient.pipelined` wraps the student's batch iterator and submits the
teacher request for batch n+1 .. n+``lookahead`` while the student trains on batch n, so at most
``lookahead + 1`` signals are ever in flight (the object store cannot fill up). Requests go
round-robin over the replicas; a request whose actor died for good is resubmitted to another one.
Time blocked on the teacher, bytes received and requests are counted for the logs.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence

import ray
from ray.exceptions import RayActorError

from vlsi_ray.runners.ray.wire import batch_key, encode_batch
from vlsi_ray.signals.teacher_signal import TeacherSignal


class TeacherClient:
    """Callable ``batch -> TeacherSignal`` over teacher actors (Ray actor handles of ``TeacherWorker``).

    ``offset`` staggers the round-robin start so that several student workers spread over replicas.
    ``ready``: ObjectRefs of calls that must finish before the first request (step 1 training the
    replicas' verbalizers: an actor orders the calls of one caller, not those of different callers).
    """

    def __init__(self, actors: Sequence, lookahead: int = 2, offset: int = 0, resubmit_attempts: int = 2, ready: Sequence = ()):
        if not actors:
            raise ValueError("TeacherClient needs at least one teacher actor; check teacher_pool.replicas.")
        self.actors = list(actors)
        self.ready = list(ready)
        self.lookahead = lookahead
        self.resubmit_attempts = resubmit_attempts
        self._next = offset
        self._pending: OrderedDict[tuple, tuple] = OrderedDict()
        self.wait_seconds = 0.0
        self.teacher_seconds = 0.0
        self.bytes_received = 0
        self.requests = 0
        self.resubmissions = 0
        self.answers_by_pid: dict[int, int] = {}  # replica process (pid) -> requests it answered

    def __getstate__(self) -> dict:  # handed to Ray Train workers: actor handles travel, refs do not
        state = dict(self.__dict__)
        state["_pending"] = OrderedDict()
        return state

    def start_at(self, replica: int) -> None:
        """Begin the round-robin at ``replica`` (each student worker passes its rank to spread the load)."""
        self._next = replica

    def submit(self, batch: dict) -> None:
        """Ask a replica for ``batch``'s signal now, unless it is already in flight."""
        key = batch_key(batch)
        if key in self._pending:
            return
        if self.ready:  # the replicas are not answering yet: the student waits for the teacher
            started = time.perf_counter()
            ray.get(self.ready)
            self.ready = []
            self.wait_seconds += time.perf_counter() - started
        encoded = encode_batch(batch)
        self._pending[key] = (self._send(encoded), encoded)

    def _send(self, encoded: dict):
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        self.requests += 1
        return actor.signal.remote(encoded)

    def __call__(self, batch: dict) -> TeacherSignal:
        """The teacher signal of ``batch`` (waits for it if it is not ready; counts the wait)."""
        key = batch_key(batch)
        if key not in self._pending:
            self.submit(batch)
        ref, encoded = self._pending.pop(key)
        started = time.perf_counter()
        for attempt in range(self.resubmit_attempts + 1):
            try:
                out = ray.get(ref)
                break
            except RayActorError:
                # Ray already retried on the restarted actor (max_task_retries); if that replica is
                # gone for good, another one answers.
                if attempt == self.resubmit_attempts:
                    raise
                self.resubmissions += 1
                ref = self._send(encoded)
        self.wait_seconds += time.perf_counter() - started
        if tuple(str(i) for i in out.pop("ids")) != key:
            raise RuntimeError("the teacher answered for different rows than asked; teacher and student batches diverged.")
        self.teacher_seconds += float(out.pop("seconds"))
        pid = int(out.pop("pid"))
        self.answers_by_pid[pid] = self.answers_by_pid.get(pid, 0) + 1
        self.bytes_received += sum(a.nbytes for a in out.values())
        device = batch["input_ids"].device if "input_ids" in batch else "cpu"
        return TeacherSignal.from_numpy(out).to(device)

    def pipelined(self, batches: Iterable[dict]) -> Iterator[dict]:
        """Yield ``batches`` in order, having submitted the next ``lookahead`` of them already."""
        buffer: deque[dict] = deque()
        for batch in batches:
            self.submit(batch)
            buffer.append(batch)
            if len(buffer) > self.lookahead:
                yield buffer.popleft()
        while buffer:
            yield buffer.popleft()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet consumed."""
        return len(self._pending)

    def counters(self) -> dict:
        """Cumulative wait/teacher seconds, bytes received, request counts and answers per replica process
        (``teacher_pids``: pid -> count; a restarted replica answers from a new pid) for the logs."""
        return {
            "teacher_wait_s": self.wait_seconds,
            "teacher_forward_s": self.teacher_seconds,
            "signal_bytes": self.bytes_received,
            "teacher_requests": self.requests,
            "teacher_resubmissions": self.resubmissions,
            "teacher_pids": dict(self.answers_by_pid),
        }
