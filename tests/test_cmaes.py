"""CMA-ES resume state: data only, refused when it carries objects, and a resume equal to an uninterrupted run."""

import csv
import os
import pickle
import shutil

import numpy as np
import pytest

from conftest import CreatesAFile, assert_ok, assert_user_error, run_script, write_config
from utils.cmaes_trainer import ResumableCMAES, generation_seeds, heldout_seeds, load_search_state, save_search_state
from utils.config import load_config
from utils.errors import UserError


def fitness(candidates):
    return [float(np.sum((c - 0.3) ** 2)) for c in candidates]


def test_controller_seed_moves_cs_episodes_only(tmp_path):
    """controller.seed null trains C on the run seed's episodes; another value gives other training and
    held-out episodes (several C seeds on one V and M), while 06's goals stay those of the run seed."""
    path = write_config(tmp_path, tmp_path / "run", seed=4)
    run = load_config([path])
    other = load_config([path], ["controller.seed=7"])
    same = load_config([path], ["controller.seed=4"])
    assert run.controller.seed is None and run.controller_seed == 4 and other.controller_seed == 7
    assert generation_seeds(run, 3) == generation_seeds(same, 3) and heldout_seeds(run) == heldout_seeds(same)
    assert not set(generation_seeds(run, 3)) & set(generation_seeds(other, 3))
    assert not set(heldout_seeds(run)) & set(heldout_seeds(other))
    assert other.seed == run.seed  # 06's goals (utils/evaluation.py) and M's episode split derive from it


def test_resumed_search_asks_exactly_what_an_uninterrupted_one_asks(tmp_path):
    straight = ResumableCMAES(num_params=12, sigma0=0.2, popsize=6, seed=3)
    asked = []
    for _ in range(6):
        c = straight.ask()
        asked.append(np.array(c))
        straight.tell(c, fitness(c))

    first = ResumableCMAES(num_params=12, sigma0=0.2, popsize=6, seed=3)
    for _ in range(3):
        c = first.ask()
        first.tell(c, fitness(c))
    path = str(tmp_path / "state.npz")
    save_search_state(path, first, {"generation": 3}, None)
    np.random.seed(12345)  # a new process: numpy's global generator is elsewhere
    arrays, meta = load_search_state(path)
    resumed = ResumableCMAES.restore(12, 0.2, 6, 3, arrays)
    assert meta == {"generation": 3}
    for g in range(3, 6):
        c = resumed.ask()
        assert np.array_equal(np.array(c), asked[g]), f"generation {g + 1} differs"
        resumed.tell(c, fitness(c))
    assert np.array_equal(resumed.mean, straight.mean) and resumed.sigma == straight.sigma


def test_a_search_started_at_x0_resumes_from_it(tmp_path):
    x0 = np.linspace(-1, 1, 8)
    straight = ResumableCMAES(num_params=8, sigma0=1e-3, popsize=6, seed=2, x0=x0)
    assert np.array_equal(straight.mean, x0)
    c = straight.ask()
    assert np.abs(np.array(c) - x0).max() < 0.02  # candidates around x0, not around zero
    straight.tell(c, fitness(c))
    path = str(tmp_path / "state.npz")
    save_search_state(path, straight, {}, None)
    following = np.array(straight.ask())
    arrays, _ = load_search_state(path)
    np.testing.assert_array_equal(arrays["x0"], x0)
    resumed = ResumableCMAES.restore(8, 1e-3, 6, 2, arrays)
    assert np.array_equal(np.array(resumed.ask()), following)
    with pytest.raises(ValueError, match="does not reproduce"):  # the replay needs x0: zeros give another search
        ResumableCMAES.restore(8, 1e-3, 6, 2, {k: v for k, v in arrays.items() if k != "x0"})


def test_stage_05_starts_at_init_from_and_dreams_from_real_windows(tiny_run, tmp_path):
    """controller.init_from: CMA-ES's mean starts at that C (a tiny sigma0 keeps it there); dream_starts anywhere
    starts each dream rollout after a real window. A C of another size, or a V checkpoint, is refused before
    anything is written."""
    import torch

    from models.controller import LinearController, LinearControllerConfig
    from utils.checkpoints import load_model, save_model

    first = tiny_run["run_dir"] + "/controller/controller.pt"
    _, first_ckpt = load_model(first, "controller")
    start = first_ckpt["params_mean"].numpy()  # evaluate.params mean: the C that init_from takes
    run_dir = tmp_path / "run"
    for stage in ("vision", "latents", "mdnrnn"):
        shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / stage)
    dream = {"env": "dream", "dream_starts": "anywhere", "max_steps": 12, "sigma0": 1e-4, "generations": 1,
             "eval_every": 5, "init_from": first}
    proc = run_script("05_train_controller", write_config(tmp_path, run_dir, controller=dream,
                                                          evaluate={"params": "mean"}))
    assert_ok(proc)
    assert "anywhere in 3 episodes, <= 12 steps), from the C of" in proc.stdout
    assert "final CMA-ES mean (evaluate.params: mean) at generation 1:" in proc.stdout
    rows = list(csv.DictReader(open(run_dir / "controller" / "history.csv")))
    assert 0 < int(rows[0]["dream_steps"]) <= 4 * 1 * 12
    _, ckpt = load_model(str(run_dir / "controller" / "controller.pt"), "controller")
    mean = ckpt["params_mean"].numpy()
    assert np.abs(mean - start).max() < 1e-2 and np.abs(start).max() > 0.05
    other = tmp_path / "other.pt"
    small = LinearController(LinearControllerConfig(), 5, np.array([-1, 0, 0.0]), np.array([1, 1, 1.0]))
    save_model(str(other), small)
    for path, expected in ((str(other), "controller.init_from"),
                           (tiny_run["run_dir"] + "/vision/best.pt", "expected a controller checkpoint")):
        fresh = tmp_path / f"fresh_{len(expected)}"
        for stage in ("vision", "latents", "mdnrnn"):
            shutil.copytree(os.path.join(tiny_run["run_dir"], stage), fresh / stage)
        config = write_config(tmp_path, fresh, controller={**dream, "init_from": path})
        assert_user_error(run_script("05_train_controller", config), expected)
        assert not (fresh / "controller").exists()
    assert torch.is_tensor(ckpt["params_mean"])


def test_an_edited_state_does_not_replay(tmp_path):
    search = ResumableCMAES(num_params=5, sigma0=0.1, popsize=4, seed=0)
    c = search.ask()
    search.tell(c, fitness(c))
    arrays = search.arrays()
    arrays["told"] = arrays["told"] + 1.0
    with pytest.raises(ValueError, match="does not reproduce"):
        ResumableCMAES.restore(5, 0.1, 4, 0, arrays)


def test_a_pickled_state_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "cmaes_state.npz"
    path.write_bytes(pickle.dumps(CreatesAFile(str(marker))))
    with pytest.raises(UserError, match="refused.*pickled objects"):
        load_search_state(str(path))
    assert not marker.exists()
    np.savez(path, told=np.zeros((1, 2)), mean=np.zeros(2), sigma=np.float64(1), best_params=np.zeros(0),
             meta=np.array([CreatesAFile(str(marker))], dtype=object))  # an object array inside a real npz
    with pytest.raises(UserError, match="refused"):
        load_search_state(str(path))
    assert not marker.exists()


def test_stage_05_resumed_equals_uninterrupted(tiny_run, tmp_path):
    """05 in the dream for 4 generations in one go, and for 2 then resumed to 4: the same history, row by row."""
    runs = {}
    for name, steps in (("straight", [4]), ("resumed", [2, 4])):
        run_dir = tmp_path / name
        for stage in ("vision", "latents", "mdnrnn"):
            shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / stage)
        for generations in steps:
            config = write_config(tmp_path / name, run_dir, controller={"env": "dream", "generations": generations,
                                                                         "eval_every": 2})
            proc = run_script("05_train_controller", config)
            assert_ok(proc)
        runs[name] = list(csv.DictReader(open(run_dir / "controller" / "history.csv")))
    assert "resuming at generation 3/4" in proc.stdout
    keys = ("generation", "best", "mean", "std", "worst", "sigma", "heldout_mean", "heldout_std", "dream_steps")
    assert [[r[k] for k in keys] for r in runs["resumed"]] == [[r[k] for k in keys] for r in runs["straight"]]
    assert len(runs["straight"]) == 4


def test_stage_05_refuses_a_crafted_state(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    for stage in ("vision", "latents", "mdnrnn"):
        shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / stage)
    (run_dir / "controller").mkdir()
    marker = tmp_path / "pwned"
    state = run_dir / "controller" / "cmaes_state.npz"
    state.write_bytes(pickle.dumps(CreatesAFile(str(marker))))
    config = write_config(tmp_path, run_dir, controller={"env": "dream"})
    assert_user_error(run_script("05_train_controller", config), "cmaes_state.npz: refused")
    assert not marker.exists() and sorted(os.listdir(run_dir / "controller")) == ["cmaes_state.npz"]
