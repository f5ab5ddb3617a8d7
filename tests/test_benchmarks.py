"""benchmarks/training_speed.py end to end on a tiny budget, with a stand-in for the reference checkout."""

import os
import re
import subprocess
import sys
import textwrap

from conftest import ROOT

# The interfaces benchmarks/training_speed.py reads from ctallec/world-models' models/vae.py and models/mdrnn.py,
# implemented minimally (a linear VAE, an LSTM with one Gaussian mixture over all dimensions).
STAND_IN_VAE = """
import torch, torch.nn as nn
class VAE(nn.Module):
    def __init__(self, channels, latents):
        super().__init__()
        self.enc, self.dec = nn.Linear(channels * 64 * 64, 2 * latents), nn.Linear(latents, channels * 64 * 64)
    def forward(self, x):
        mu, logsigma = self.enc(x.view(x.size(0), -1)).chunk(2, dim=1)
        z = mu + logsigma.exp() * torch.randn_like(mu)
        return torch.sigmoid(self.dec(z)).view_as(x), mu, logsigma
"""
STAND_IN_MDRNN = """
import torch, torch.nn as nn
def gmm_loss(batch, mus, sigmas, logpi):
    log_prob = torch.distributions.Normal(mus, sigmas).log_prob(batch.unsqueeze(-2)).sum(-1) + logpi
    return -torch.logsumexp(log_prob, dim=-1).mean()
class MDRNN(nn.Module):
    def __init__(self, latents, actions, hiddens, gaussians):
        super().__init__()
        self.latents, self.gaussians = latents, gaussians
        self.rnn = nn.LSTM(latents + actions, hiddens)
        self.out = nn.Linear(hiddens, (2 * latents + 1) * gaussians + 2)
    def forward(self, actions, latents):
        h, _ = self.rnn(torch.cat([actions, latents], dim=-1))
        o = self.out(h)
        T, B, G, L = h.size(0), h.size(1), self.gaussians, self.latents
        mus = o[..., : G * L].view(T, B, G, L)
        sigmas = o[..., G * L : 2 * G * L].view(T, B, G, L).exp()
        logpi = torch.log_softmax(o[..., 2 * G * L : 2 * G * L + G], dim=-1)
        return mus, sigmas, logpi, o[..., -2], o[..., -1]
"""


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "training_speed.py"), "--episodes", "2", "--max-steps", "40",
         "--blocks", "1", "--steps", "1", "--threads", "1", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


def test_training_speed_prints_every_row_beside_the_reference(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vae.py").write_text(textwrap.dedent(STAND_IN_VAE))
    (tmp_path / "models" / "mdrnn.py").write_text(textwrap.dedent(STAND_IN_MDRNN))
    proc = run_benchmark("--reference", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "2 CarRacing-v3 episodes, 80 frames" in proc.stdout
    for row in ("02 update", "04 update", "04 step"):  # ours, the reference and the ratio on one line
        assert re.search(rf"^{row} +[\d.]+ +\d+ \w+ +[\d.]+ +\d+ \w+ +[\d.]+x$", proc.stdout, re.M), proc.stdout
    for row in ("02 step", "02 NVAE update"):  # ours only
        assert re.search(rf"^{row} +[\d.]+ +\d+ img$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^02 epoch \(stage 02's loop, 40 images, held-out evaluation on 40 frames", proc.stdout, re.M)


def test_training_speed_names_a_reference_folder_without_the_models(tmp_path):
    proc = run_benchmark("--reference", str(tmp_path))
    assert proc.returncode != 0
    assert f"--reference {tmp_path}: no models/vae.py there" in proc.stderr


def test_action_stats_counts_the_data_and_plays_c_on_ms_states(tiny_run):
    """benchmarks/action_stats.py: the mean, the share above a threshold and the long runs match the episodes;
    C's actions are played on M's filtered states within the action bounds; a bad --dim is one clear line."""
    import glob

    import numpy as np

    from conftest import assert_ok, assert_user_error

    run_dir = tiny_run["run_dir"]
    args = [sys.executable, "benchmarks/action_stats.py", "--config", tiny_run["config"], "--set", f"run_dir={run_dir}"]
    proc = subprocess.run(args + ["--dim", "1", "--above", "0.5", "--run", "2", "--controller",
                                  os.path.join(run_dir, "controller", "controller.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    files = sorted(glob.glob(os.path.join(run_dir, "latents", "episode_*.npz")))
    gas = [np.load(f)["actions"][:, 1] for f in files]
    values = np.concatenate(gas)
    assert (f"{len(files)} episodes, {len(values)} steps: action[1] mean {values.mean():.3f}, share above 0.5 "
            f"{np.mean(values > 0.5):.3f}") in proc.stdout
    listed = re.findall(r"(episode_\d+\.npz): (\d+) steps above", proc.stdout)
    for f, g in zip(files, gas):
        longest = max((len(r) for r in "".join("1" if x else "0" for x in g > 0.5).split("0")), default=0)
        assert ((os.path.basename(f), str(longest)) in listed) == (longest > 2)
    played = re.search(r"C on M's filtered states of the last 3 episodes \((\d+) steps\): action mean \[(.*)\], std",
                       proc.stdout)
    assert played and int(played.group(1)) == len(values)
    steer, gas_mean, brake = (float(v) for v in played.group(2).split(", "))
    assert -1 <= steer <= 1 and 0 <= gas_mean <= 1 and 0 <= brake <= 1
    bad = subprocess.run(args + ["--dim", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_user_error(bad, "--dim", "3 dimensions")
