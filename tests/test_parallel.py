"""The worker pool: results in order, crashed and hung workers detected and their task re-run."""

import os
import time

import pytest

from utils.parallel import WorkerError, WorkerPool


# Module-level functions: spawned workers import them from here.
def init_state(marker_dir):
    return {"dir": marker_dir}


def square(state, x):
    return x * x


def crash_once(state, x):
    """Kill the worker process (as a segfault would) the first time task x runs."""
    marker = os.path.join(state["dir"], f"crashed_{x}")
    if x == 2 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return x * 10


def hang_once(state, x):
    marker = os.path.join(state["dir"], f"hung_{x}")
    if x == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(600)
    return -x


def always_crash(state, x):
    os._exit(3)


def raise_error(state, x):
    raise ValueError(f"bad task {x}")


def test_results_in_task_order(tmp_path):
    with WorkerPool(2, init_state, (str(tmp_path),), square) as pool:
        assert pool.map(range(7)) == [x * x for x in range(7)]
        assert pool.map([3]) == [9]  # the pool is reusable
        assert pool.restarts == 0


def test_crashed_worker_is_replaced_and_task_rerun(tmp_path):
    with WorkerPool(2, init_state, (str(tmp_path),), crash_once, timeout_s=60) as pool:
        assert pool.map(range(5)) == [0, 10, 20, 30, 40]
        assert pool.restarts == 1


def test_hung_worker_is_killed_and_task_rerun(tmp_path):
    start = time.monotonic()
    with WorkerPool(2, init_state, (str(tmp_path),), hang_once, timeout_s=3) as pool:
        assert pool.map(range(4)) == [0, -1, -2, -3]
        assert pool.restarts == 1
    assert time.monotonic() - start < 60


def test_gives_up_after_max_retries(tmp_path):
    with WorkerPool(1, init_state, (str(tmp_path),), always_crash, timeout_s=30, max_retries=1) as pool:
        with pytest.raises(WorkerError, match="crashed 2 times"):
            pool.map([0])


def test_exception_in_task_is_raised_with_traceback(tmp_path):
    with WorkerPool(1, init_state, (str(tmp_path),), raise_error) as pool:
        with pytest.raises(WorkerError, match="ValueError: bad task 5"):
            pool.map([5])


def die_after_result(state, x):
    """Send the result, then die while idle (as an OOM kill between generations would)."""
    import threading

    if x == 0:
        threading.Timer(0.2, os._exit, args=(1,)).start()
    return x + 100


def test_worker_that_dies_while_idle_is_replaced(tmp_path):
    with WorkerPool(1, init_state, (str(tmp_path),), die_after_result, timeout_s=30) as pool:
        assert pool.map([0]) == [100]
        time.sleep(1.0)  # the worker is dead now; the next send must not crash the pool
        assert pool.map([1, 2]) == [101, 102]
        assert pool.restarts == 1


def stop_once(state, x):
    """Task x = 3 stops its own worker (SIGSTOP) the first time: a hang no exception reports."""
    import signal

    marker = os.path.join(state["dir"], f"stopped_{x}")
    time.sleep(0.05)
    if x == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGSTOP)
    return {"steps": 10, "x": x}


def test_a_stopped_worker_is_caught_by_the_derived_timeout(tmp_path):
    """No fixed timeout: after tasks of ~0.05 s for 10 steps, the hang timeout is max(5 s, 20 x 0.005 x 10 steps),
    so a SIGSTOP'd worker costs seconds, not the first-task bound of 600 s."""
    start = time.monotonic()
    with WorkerPool(2, init_state, (str(tmp_path),), stop_once, first_timeout_s=600, task_steps=10) as pool:
        assert [r["x"] for r in pool.map(range(6))] == list(range(6))
        assert pool.restarts == 1 and pool.hang_timeout_s() < 10
    assert time.monotonic() - start < 60


def test_workers_die_with_their_parent(tmp_path):
    """A parent killed with SIGKILL (no cleanup runs) takes its workers with it."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    script = (
        "import sys, time; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
        "from test_parallel import init_state, square\n"
        "from utils.parallel import WorkerPool\n"
        "pool = WorkerPool(2, init_state, ('.',), square)\n"
        "print(' '.join(str(w.proc.pid) for w in pool.workers), flush=True)\n"
        "pool.map([1, 2])\n"
        "time.sleep(600)\n"
    ) % (ROOT, os.path.join(ROOT, "tests"))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    time.sleep(3)  # the workers are up and idle
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), "orphaned workers outlived their parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead, waiting for init to reap it
    except FileNotFoundError:
        return False
