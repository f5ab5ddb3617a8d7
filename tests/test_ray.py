"""The Ray backend on a real 2-node Ray cluster on this machine (ray.cluster_utils.Cluster), no mocks.

Stages 01, 05 and 06 with backend.kind=ray write the same episodes, fitness values and scores as the local
backend (tiny_run, the same config); an actor killed by its pid in the middle of a generation, or stopped
with SIGSTOP, has its episode re-run on a restarted actor.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, assert_ok, run_script, write_config

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one CPU each: two separate raylets, as two machines would have."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def ray_backend(cluster) -> dict:
    return {"kind": "ray", "address": cluster.address}


def copy_run(tiny_run, run_dir, stages):
    for stage in stages:
        shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / stage)


def actor_pids(busy_only: bool) -> list[int]:
    """Processes of our Ray actors, from their titles: ray::EpisodeActor (idle) or ray::EpisodeActor.run."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if title.startswith("ray::EpisodeActor") and (not busy_only or title.startswith("ray::EpisodeActor.run")):
            pids.append(int(pid))
    return pids


HISTORY_KEYS = ("generation", "best", "mean", "std", "worst", "heldout_mean", "heldout_std", "sigma", "env_steps",
                "early_stopped")


def history(path) -> list[list[str]]:
    return [[row[k] for k in HISTORY_KEYS] for row in csv.DictReader(open(path))]


def test_05_survives_an_actor_killed_mid_generation(tiny_run, cluster, tmp_path):
    run_dir = tmp_path / "run"
    copy_run(tiny_run, run_dir, ("vision", "mdnrnn"))
    config = write_config(tmp_path, run_dir, backend=ray_backend(cluster))
    cmd = [sys.executable, os.path.join(ROOT, "05_train_controller.py"), "--config", config]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.monotonic() + 240
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        busy = actor_pids(busy_only=True)
        if busy:
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)  # as an OOM kill or a lost machine would
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert killed is not None, "no actor was seen running an episode"
    rows = list(csv.DictReader(open(run_dir / "controller" / "history.csv")))
    assert int(rows[-1]["worker_restarts"]) >= 1  # the restart is counted, as the local pool counts its own
    local = os.path.join(tiny_run["run_dir"], "controller", "history.csv")
    assert history(run_dir / "controller" / "history.csv") == history(local)  # same tracks, same fitness


def test_01_and_06_with_ray_write_what_the_local_backend_writes(tiny_run, cluster, tmp_path):
    run_dir = tmp_path / "run"
    copy_run(tiny_run, run_dir, ("vision", "latents", "mdnrnn", "controller"))
    config = write_config(tmp_path, run_dir, backend=ray_backend(cluster))
    assert_ok(run_script("01_generate_rollouts", config))
    for name in sorted(os.listdir(os.path.join(tiny_run["run_dir"], "rollouts"))):
        if name.endswith(".npz"):
            with np.load(run_dir / "rollouts" / name) as ours, np.load(os.path.join(tiny_run["run_dir"], "rollouts", name)) as local:
                assert ours.files == local.files
                for key in local.files:
                    np.testing.assert_array_equal(ours[key], local[key], err_msg=f"{name}: {key}")
    assert_ok(run_script("06_evaluate", config))
    ours = json.load(open(run_dir / "eval" / "scores.json"))
    local = json.load(open(os.path.join(tiny_run["run_dir"], "eval", "scores.json")))
    for key in ("returns", "steps", "seeds", "mean", "std"):
        assert ours[key] == local[key], key


# Task functions for RayPool: test_parallel's (init_state, stop_once), and one that raises. The actors get
# them by value (tests/ is not on their path).
def fail(state, x):
    """A task that raises: a bug, reported with its traceback and never retried."""
    raise ValueError(f"bad task {x}")


def test_ray_pool_restarts_a_stopped_actor_and_reports_task_errors(cluster, tmp_path):
    from ray import cloudpickle

    from utils.config import BackendConfig
    from utils.parallel import WorkerError
    from utils.ray_backend import RayPool

    import test_parallel
    from test_parallel import init_state, stop_once

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cloudpickle.register_pickle_by_value(test_parallel)
    backend = BackendConfig(kind="ray", address=cluster.address, actors=2)
    start = time.monotonic()
    with RayPool(backend, init_state, (str(tmp_path),), stop_once, first_timeout_s=600, task_steps=10) as pool:
        assert [r["x"] for r in pool.map(range(6), on_result=lambda i, r: {**r, "seen": i})] == list(range(6))
        assert pool.restarts == 1 and pool.hang_timeout_s() < 10
    assert time.monotonic() - start < 90
    with RayPool(backend, init_state, (str(tmp_path),), fail) as pool:
        with pytest.raises(WorkerError, match="ValueError: bad task 5"):
            pool.map([5])


def test_an_unreachable_cluster_is_one_line(tmp_path):
    from conftest import assert_user_error

    run_dir = tmp_path / "run"
    config = write_config(tmp_path, run_dir, backend={"kind": "ray", "address": "127.0.0.1:1"})
    assert_user_error(run_script("01_generate_rollouts", config, timeout=180), "backend.address", "127.0.0.1:1")
