"""A pool of long-lived worker processes that never hangs the caller.

Each worker builds its state once (`init_fn(*init_args)`, e.g. an env plus V
and M) and then runs `task_fn(state, task)` for one task at a time, sent over
its own pipe. The parent waits on the pipes and on the process sentinels with
a timeout, so

- a worker that dies (segfault, OOM kill, os._exit) is seen at once,
- a worker that runs a task longer than the hang timeout is killed (stopped
  with SIGSTOP, deadlocked, ...); the timeout is `timeout_s` when given, else it
  scales with the episode: `first_timeout_s` until a task has finished, then 20
  times the slowest seconds per step seen so far times `task_steps`, at least
  `MIN_TIMEOUT_S`,

and in both cases a fresh worker is started and the task is re-run, at most
`max_retries` times, after which `WorkerError` is raised. An exception raised
inside `task_fn` is a bug, not bad luck: it is raised in the parent with the
worker's traceback, without retrying.

Workers die with their parent (Linux PR_SET_PDEATHSIG), so a killed stage
leaves no orphan playing episodes. init_fn and task_fn must be importable
module-level functions (workers are started with the "spawn" method, which is
safe with torch's thread pools).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable

from tqdm import tqdm

MIN_TIMEOUT_S = 5.0
HANG_FACTOR = 20.0  # a task is hung when it takes this many times the slowest per-step time seen


class WorkerError(RuntimeError):
    """A task failed in a worker (an exception, or crashes/hangs beyond max_retries)."""


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the daemon flag still ends workers on a clean exit
        pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _worker_main(conn, init_fn: Callable, init_args: tuple, task_fn: Callable, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        state = init_fn(*init_args)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("init_error", None, traceback.format_exc()))
        return
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        index, task = msg
        try:
            conn.send(("ok", index, task_fn(state, task)))
        except BaseException:  # noqa: BLE001
            conn.send(("error", index, traceback.format_exc()))


class _Worker:
    def __init__(self, ctx, init_fn, init_args, task_fn):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, init_fn, init_args, task_fn, os.getpid()),
                                daemon=True)
        self.proc.start()
        child.close()
        self.task: int | None = None  # index of the running task
        self.started = time.monotonic()  # start of the process, then of its current task
        self.ready = False

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class HangTimeout:
    """When a running task counts as hung: `timeout_s` when > 0, else `first_timeout_s` until a task has finished,
    then HANG_FACTOR x the slowest seconds per env step seen so far x `task_steps`, at least MIN_TIMEOUT_S."""

    def __init__(self, timeout_s: float = 0.0, first_timeout_s: float = 600.0, task_steps: int = 1000):
        self.timeout_s, self.first_timeout_s, self.task_steps = timeout_s, first_timeout_s, task_steps
        self.slowest_step_s = 0.0  # the slowest seconds per env step of a finished task

    def observe(self, result: Any, seconds: float) -> None:
        """Learn the per-step time from a finished task that reports its "steps"."""
        steps = result.get("steps") if isinstance(result, dict) else None
        if steps:
            self.slowest_step_s = max(self.slowest_step_s, seconds / steps)

    def __call__(self) -> float:
        if self.timeout_s > 0:
            return self.timeout_s
        if not self.slowest_step_s:
            return self.first_timeout_s
        return max(MIN_TIMEOUT_S, HANG_FACTOR * self.slowest_step_s * self.task_steps)


class WorkerPool:
    """Run tasks on `n_workers` processes with crash and hang detection (see module docstring).

    Args:
        timeout_s: fixed hang timeout per task in seconds; 0 derives it from the episodes (module docstring).
        first_timeout_s: the derived timeout before any task has finished.
        task_steps: the most env steps a task may take (for the derived timeout; tasks report "steps").
        max_retries: re-runs of a task whose worker crashed or hung, before WorkerError.
        init_timeout_s: the longest a worker may take to build its state.
    """

    def __init__(
        self,
        n_workers: int,
        init_fn: Callable,
        init_args: tuple,
        task_fn: Callable,
        timeout_s: float = 0.0,
        max_retries: int = 2,
        init_timeout_s: float = 300.0,
        first_timeout_s: float = 600.0,
        task_steps: int = 1000,
    ):
        self.ctx = mp.get_context("spawn")
        self.args = (init_fn, init_args, task_fn)
        self.max_retries, self.init_timeout_s = max_retries, init_timeout_s
        self.hang_timeout_s = HangTimeout(timeout_s, first_timeout_s, task_steps)
        self.workers = [_Worker(self.ctx, *self.args) for _ in range(max(1, n_workers))]
        self.restarts = 0  # workers replaced after a crash or a hang, over the pool's life
        self.start_failures = 0  # workers that died before they were ready

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self.workers:
            try:
                if w.proc.is_alive():
                    w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self.workers:
            w.proc.join(timeout=2)
            w.kill()

    def _replace(self, i: int) -> None:
        self.workers[i].kill()
        self.workers[i] = _Worker(self.ctx, *self.args)
        self.restarts += 1

    def map(self, tasks: Iterable[Any], progress: str | None = None,
            on_result: Callable[[int, Any], Any] | None = None) -> list[Any]:
        """Run every task; return the results in task order. `on_result(index, result)`, when given, runs in this
        process as each result arrives (e.g. to write it to disk), and what it returns is kept instead."""
        tasks = list(tasks)
        results: list[Any] = [None] * len(tasks)
        pending = list(range(len(tasks)))[::-1]  # pop() takes from the end
        tries = [0] * len(tasks)
        done = 0
        bar = tqdm(total=len(tasks), desc=progress, leave=False, disable=None if progress else True)
        try:
            while done < len(tasks):
                self._dispatch(pending, tasks)
                by_conn = {w.conn: i for i, w in enumerate(self.workers)}
                by_sentinel = {w.proc.sentinel: i for i, w in enumerate(self.workers)}
                ready = wait(list(by_conn) + list(by_sentinel), timeout=1.0)
                handled = set()
                for obj in ready:
                    i = by_conn.get(obj, by_sentinel.get(obj))
                    if i in handled:
                        continue
                    handled.add(i)
                    w = self.workers[i]
                    if obj in by_conn or w.conn.poll():
                        try:
                            status, index, payload = w.conn.recv()
                        except (EOFError, OSError):
                            status, index, payload = "died", w.task, None
                    else:
                        status, index, payload = "died", w.task, None
                    if status == "ready":
                        w.ready = True
                    elif status == "ok":
                        self.hang_timeout_s.observe(payload, time.monotonic() - w.started)
                        results[index] = on_result(index, payload) if on_result else payload
                        w.task = None
                        done += 1
                        bar.update(1)
                    elif status in ("error", "init_error"):
                        raise WorkerError(f"worker task failed:\n{payload}")
                    else:  # the process died
                        self._retry(i, index, pending, tries, "crashed")
                now, timeout = time.monotonic(), self.hang_timeout_s()
                for i, w in enumerate(self.workers):
                    if w.task is not None and now - w.started > timeout:
                        self._retry(i, w.task, pending, tries, f"hung for more than {timeout:.0f} s")
                    elif w.task is None and not w.ready and now - w.started > self.init_timeout_s:
                        raise WorkerError(f"a worker did not start within {self.init_timeout_s:.0f} s")
        finally:
            bar.close()
        return results

    def _dispatch(self, pending: list[int], tasks: list[Any]) -> None:
        for i, w in enumerate(self.workers):
            if w.ready and w.task is None and pending:
                index = pending.pop()
                try:
                    w.conn.send((index, tasks[index]))
                except OSError:  # the worker died while idle: replace it, keep the task
                    pending.append(index)
                    self._replace(i)
                    continue
                w.task, w.started = index, time.monotonic()

    def _retry(self, i: int, index: int | None, pending: list[int], tries: list[int], why: str) -> None:
        was_ready = self.workers[i].ready
        self._replace(i)
        if index is None:
            if was_ready:  # died while idle, after a result: nothing to re-run
                return
            self.start_failures += 1
            if self.start_failures > self.max_retries + len(self.workers):
                raise WorkerError(f"workers keep dying while starting ({self.start_failures} times)")
            return
        tries[index] += 1
        if tries[index] > self.max_retries:
            raise WorkerError(f"task {index}: worker {why} {tries[index]} times, giving up")
        tqdm.write(f"warning: worker {why} on task {index}; restarted it and re-running the task")
        pending.append(index)


def check_backend(backend) -> None:
    """Reach the backend before a stage claims its folder: for ray, start or join the cluster (once per process).

    Raises:
        UserError: the Ray cluster cannot be started or reached.
    """
    if backend.kind == "ray":
        from utils.ray_backend import connect

        connect(backend.address)


def make_pool(backend, n_workers: int, init_fn: Callable, init_args: tuple, task_fn: Callable, **options):
    """The pool of the config's backend section (utils.config.BackendConfig): a WorkerPool of `n_workers`
    local processes, or a RayPool of actors (utils/ray_backend.py). Both run `task_fn(init_fn(*init_args),
    task)` for each task, have `map(tasks, progress, on_result)` and count `restarts`; `options` are the hang and
    retry settings of WorkerPool.

    Raises:
        UserError: ray asked for and it cannot start or be reached.
    """
    if backend.kind == "ray":
        from utils.ray_backend import RayPool

        return RayPool(backend, init_fn, init_args, task_fn, **options)
    return WorkerPool(n_workers, init_fn, init_args, task_fn, **options)
