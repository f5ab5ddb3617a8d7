"""Bad input: one clear line naming the file or key, exit status 2, nothing on disk changed."""

import os
import shutil

from conftest import assert_user_error, run_script, write_config


def snapshot(folder):
    """{relative path: (size, mtime_ns)} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = (os.path.getsize(p), os.stat(p).st_mtime_ns)
    return out


def test_missing_config_file():
    assert_user_error(run_script("01_generate_rollouts", "configs/no_such.yaml"), "configs/no_such.yaml", "not found")


def test_config_typo_is_named(tmp_path):
    config = write_config(tmp_path, tmp_path / "run", vision={"z_dimm": 4})
    for stage in ("01_generate_rollouts", "04_train_mdnrnn"):
        assert_user_error(run_script(stage, config), "config.yaml", "unknown key 'vision.z_dimm'")
    assert not (tmp_path / "run").exists()


def test_override_typo_is_named(tmp_path):
    config = write_config(tmp_path, tmp_path / "run")
    assert_user_error(run_script("05_train_controller", config, "--set", "controller.popsize=many"),
                      "controller.popsize", "expected int")


def test_missing_rollouts_folder(tmp_path):
    config = write_config(tmp_path, tmp_path / "run")
    assert_user_error(run_script("02_train_nvae", config), "rollouts", "folder not found")
    assert not (tmp_path / "run" / "vision").exists()


def test_empty_rollouts_folder(tmp_path):
    (tmp_path / "run" / "rollouts").mkdir(parents=True)
    config = write_config(tmp_path, tmp_path / "run")
    assert_user_error(run_script("02_train_nvae", config), "rollouts", "no episode_*.npz")
    assert os.listdir(tmp_path / "run") == ["rollouts"]


def test_corrupt_npz_among_good_ones(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(tiny_run["run_dir"], "rollouts"), run_dir / "rollouts")
    with open(run_dir / "rollouts" / "episode_00001.npz", "r+b") as f:
        f.truncate(100)  # a rollout cut short, as by a full disk
    before = snapshot(run_dir)
    config = write_config(tmp_path, run_dir)
    assert_user_error(run_script("02_train_nvae", config), "episode_00001.npz", "corrupt")
    assert snapshot(run_dir) == before


def test_checkpoint_of_the_wrong_kind(tiny_run):
    run_dir = tiny_run["run_dir"]
    before = snapshot(run_dir)
    wrong = os.path.join(run_dir, "mdnrnn", "best.pt")
    assert_user_error(run_script("03_encode_latents", tiny_run["config"], "--vision", wrong),
                      "mdnrnn/best.pt", "kind 'mdnrnn'")
    vision = os.path.join(run_dir, "vision", "best.pt")
    assert_user_error(run_script("06_evaluate", tiny_run["config"], "--controller", vision),
                      "vision/best.pt", "expected a controller checkpoint")
    assert snapshot(run_dir) == before


def test_latent_size_that_does_not_match_the_checkpoint(tiny_run):
    before = snapshot(tiny_run["run_dir"])
    for stage in ("03_encode_latents", "05_train_controller"):
        proc = run_script(stage, tiny_run["config"], "--set", "vision.z_dim=16")
        assert_user_error(proc, "vision/best.pt", "z_dim=8", "'vision.z_dim' is 16")
    assert snapshot(tiny_run["run_dir"]) == before
