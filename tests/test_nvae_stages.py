"""Stages 02-06 with vision.kind=nvae on a tiny budget, and the vision comparison script."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import ROOT
from models.nvae import NVAE
from utils.checkpoints import load_model


def test_stages_end_to_end_with_nvae(tiny_nvae_run):
    run_dir = tiny_nvae_run["run_dir"]
    vision, ckpt = load_model(os.path.join(run_dir, "vision", "best.pt"), "vision")
    assert isinstance(vision, NVAE) and ckpt["kind"] == "nvae"
    assert vision.likelihood == "logistic_mixture" and [len(f) for f in vision.flows] == [0, 1, 1]
    log = [json.loads(line) for line in open(os.path.join(run_dir, "vision", "train_log.jsonl"))]
    assert {"kl_group0", "kl_group2", "reg", "kl_coeff", "val_mse_full"} <= set(log[0])
    assert np.isfinite(log[0]["val_neg_elbo"]) and log[0]["skipped_updates"] == 0
    with np.load(os.path.join(run_dir, "latents", "episode_00000.npz")) as lat:
        assert lat["mu"].shape == (40, 16)
    scores = json.load(open(os.path.join(run_dir, "eval", "scores.json")))
    assert len(scores["returns"]) == 2
    assert os.path.exists(os.path.join(run_dir, "eval", "episode.gif"))


def test_compare_vision_prints_both_rows(tiny_run, tiny_nvae_run):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "compare_vision.py"),
         tiny_run["run_dir"], tiny_nvae_run["run_dir"], "--frames", "24"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "/run" in line]
    assert len(rows) == 2 and "| vae | 8 | gaussian |" in rows[0] and "| nvae | 16 | logistic_mixture |" in rows[1]
    scores = json.load(open(os.path.join(tiny_nvae_run["run_dir"], "eval", "scores.json")))
    assert f"{scores['mean']:.1f} +- {scores['std']:.1f}" in rows[1]
    assert "Held-out frames: 24" in proc.stdout
