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
