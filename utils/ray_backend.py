"""The Ray backend: the real-env episodes of stages 01, 05 and 06 on long-lived actors of a Ray cluster.

`RayPool` has the interface of utils.parallel.WorkerPool (`map(tasks,
progress, on_result)`, `restarts`, a context manager), so a stage does not
know which one it drives (utils.parallel.make_pool picks by backend.kind):

- one actor per CPU of the cluster (or backend.actors), each building its
  state once with `init_fn(*init_args)` (an env plus V, M and C); the
  init_args (the checkpoints' weights) are put into the object store once per
  stage and handed to every actor by reference;
- the code actors need (models/ and utils/) is shipped with the job
  (runtime_env py_modules), so cluster nodes need only the same install;
- one task in flight per actor, results gathered as they finish (ray.wait with
  a timeout: the driver never waits without a bound), in task order at the end;
- faults through Ray's own mechanisms: actors are restartable (max_restarts)
  and their tasks retried (max_task_retries = max_retries), so an actor or a
  node that dies has its episode re-run on a restarted actor; a task running
  past the hang timeout (utils.parallel.HangTimeout) gets its actor killed with
  a restart, and Ray re-runs the task; `restarts` counts actor restarts (new
  actor processes seen), like WorkerPool's.

Seeds and fitness values are those of the local backend: the tasks and what
each one computes are the same.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable, Iterable

from tqdm import tqdm

from utils.errors import UserError
from utils.parallel import HangTimeout, WorkerError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONNECT_TIMEOUT_S = 10.0  # the longest a stage waits to open a connection to the cluster's head


class EpisodeActor:
    """A Ray actor holding `init_fn(*init_args)`, its arguments fetched from the object store (`shared`: their
    ObjectRefs), and running `task_fn(state, task)`; each call returns (the actor's process id, the result)."""

    def __init__(self, init_fn: Callable, task_fn: Callable, shared: list):
        import ray

        self.state, self.task_fn = init_fn(*ray.get(shared)), task_fn

    def ready(self) -> int:
        """The actor's process id, once its state is built."""
        return os.getpid()

    def run(self, task: Any) -> tuple[int, Any]:
        """(process id, task_fn(state, task)): the id tells the driver when the actor was restarted."""
        return os.getpid(), self.task_fn(self.state, task)


def connect(address: str | None) -> None:
    """Start a local Ray (address None) or join the cluster at `address`, once per process.

    Raises:
        UserError: Ray cannot start or the cluster cannot be reached.
    """
    import ray

    if ray.is_initialized():
        return
    if address not in (None, "auto"):  # ray.init retries an unreachable head for minutes: fail fast instead
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            raise UserError(f"backend.address: cannot reach the Ray cluster at {address} ({exc}); start it with "
                            "`ray start --head` or fix the address") from None
    runtime_env = {"py_modules": [os.path.join(ROOT, "models"), os.path.join(ROOT, "utils")]}
    try:
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "start a local Ray" if address is None else f"reach the Ray cluster at {address}"
        raise UserError(f"backend.address: cannot {where} ({str(exc).splitlines()[0]})") from None


class RayPool:
    """Run tasks on Ray actors with restarts, retries and hang detection (see the module docstring).

    Args:
        backend: the config's BackendConfig (address, actors).
        init_fn, init_args, task_fn: as for WorkerPool (importable module-level functions).
        timeout_s, first_timeout_s, task_steps: the hang timeout (utils.parallel.HangTimeout).
        max_retries: Ray's max_task_retries of every episode (crashes and hangs).
        init_timeout_s: the longest the actors may take to build their state.

    Raises:
        WorkerError: actors that fail to start or time out starting.
    """

    def __init__(self, backend, init_fn: Callable, init_args: tuple, task_fn: Callable, timeout_s: float = 0.0,
                 max_retries: int = 2, init_timeout_s: float = 300.0, first_timeout_s: float = 600.0,
                 task_steps: int = 1000):
        import ray

        connect(backend.address)
        n_actors = backend.actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        # The weights go into the object store once; the pool holds the references for its life, so a restarted
        # actor finds its constructor arguments there.
        self.shared = [ray.put(arg) for arg in init_args]
        actor_class = ray.remote(EpisodeActor).options(num_cpus=1, max_restarts=-1, max_task_retries=max_retries)
        self.actors = [actor_class.remote(init_fn, task_fn, self.shared) for _ in range(n_actors)]
        self.hang_timeout_s = HangTimeout(timeout_s, first_timeout_s, task_steps)
        self.max_retries, self.init_timeout_s = max_retries, init_timeout_s
        started = [actor.ready.remote() for actor in self.actors]
        done, _ = ray.wait(started, num_returns=len(started), timeout=init_timeout_s)
        if len(done) < len(started):
            self.close()
            raise WorkerError(f"{len(started) - len(done)} of {len(started)} Ray actors did not start within "
                              f"{init_timeout_s:.0f} s (are there {n_actors} free CPUs in the cluster?)")
        try:
            self.pids = [{pid} for pid in ray.get(started)]
        except ray.exceptions.RayError as exc:
            self.close()
            raise WorkerError(f"a Ray actor failed to start:\n{exc}") from None

    @property
    def workers(self) -> list:
        """The actors (WorkerPool's name for its processes)."""
        return self.actors

    @property
    def restarts(self) -> int:
        """Actor restarts over the pool's life (after a crash, a node loss or a hang): the new actor processes
        that have returned a result."""
        return sum(len(p) - 1 for p in self.pids)

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill every actor for good (no restart)."""
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def map(self, tasks: Iterable[Any], progress: str | None = None,
            on_result: Callable[[int, Any], Any] | None = None) -> list[Any]:
        """Run every task; return the results in task order (`on_result` as in WorkerPool.map).

        Raises:
            WorkerError: a task raised (a bug: its traceback), or its actor kept dying beyond max_retries.
        """
        import ray

        tasks = list(tasks)
        results: list[Any] = [None] * len(tasks)
        pending = list(range(len(tasks)))[::-1]  # pop() takes from the end
        free = list(range(len(self.actors)))
        in_flight: dict = {}  # ObjectRef -> [actor index, task index, start time, kills]
        bar = tqdm(total=len(tasks), desc=progress, leave=False, disable=None if progress else True)
        try:
            while pending or in_flight:
                while free and pending:
                    i, index = free.pop(), pending.pop()
                    in_flight[self.actors[i].run.remote(tasks[index])] = [i, index, time.monotonic(), 0]
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    i, index, started, kills = in_flight.pop(ref)
                    try:
                        pid, payload = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        raise WorkerError(f"worker task failed:\n{exc}") from None
                    except ray.exceptions.RayActorError as exc:
                        raise WorkerError(f"task {index}: its actor died more than {self.max_retries} times, "
                                          f"giving up ({type(exc).__name__})") from None
                    self.pids[i].add(pid)
                    if not kills:  # a re-run's time includes its actor's restart: not an episode's time
                        self.hang_timeout_s.observe(payload, time.monotonic() - started)
                    results[index] = on_result(index, payload) if on_result else payload
                    free.append(i)
                    bar.update(1)
                self._kill_hung(in_flight)
        finally:
            bar.close()
        return results

    def _kill_hung(self, in_flight: dict) -> None:
        """Restart the actor of every task past the hang timeout; Ray re-runs the task on the new actor."""
        import ray

        now, timeout = time.monotonic(), self.hang_timeout_s()
        for entry in in_flight.values():
            i, index, started, kills = entry
            if now - started > timeout + (self.init_timeout_s if kills else 0):  # a restart first rebuilds the state
                if kills >= self.max_retries:
                    raise WorkerError(f"task {index}: hung for more than {timeout:.0f} s {kills + 1} times, giving up")
                tqdm.write(f"warning: task {index} hung for more than {timeout:.0f} s; restarting its Ray actor")
                ray.kill(self.actors[i], no_restart=False)
                entry[2:] = [now, kills + 1]
