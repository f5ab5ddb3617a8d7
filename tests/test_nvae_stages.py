"""Stages 02-06 with vision.kind=nvae on a tiny budget, on the rollouts of the tiny VAE run."""

import json
import os
import shutil

import numpy as np

from conftest import assert_ok, run_script, write_config
from models import load_vision
from models.nvae import NVAE

NVAE_TINY = {
    "kind": "nvae", "z_dim": 16, "epochs": 1, "batch_size": 16, "val_frames": 16, "workers": 1,
    "nvae": {"channels": 4, "preprocess_blocks": 2, "latent_scales": 3, "groups_per_scale": 1, "latent_channels": 1},
}


def test_stages_end_to_end_with_nvae(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(tiny_run["run_dir"], "rollouts"), run_dir / "rollouts")
    config = write_config(tmp_path, run_dir, vision=NVAE_TINY, evaluate={"episodes": 2, "max_steps": 30})
    for stage in ("02_train_nvae", "03_encode_latents", "04_train_mdnrnn", "05_train_controller", "06_evaluate"):
        assert_ok(run_script(stage, config))
    vision, ckpt = load_vision(str(run_dir / "vision" / "best.pt"))
    assert isinstance(vision, NVAE) and ckpt["kind"] == "nvae"
    log = [json.loads(line) for line in open(run_dir / "vision" / "train_log.jsonl")]
    assert {"kl_group0", "kl_group2", "reg", "kl_coeff", "val_mse_full"} <= set(log[0])
    assert np.isfinite(log[0]["val_neg_elbo"])
    with np.load(run_dir / "latents" / "episode_00000.npz") as lat:
        assert lat["mu"].shape == (40, 16)
    scores = json.load(open(run_dir / "eval" / "scores.json"))
    assert len(scores["returns"]) == 2
    assert os.path.exists(run_dir / "eval" / "episode.gif")
