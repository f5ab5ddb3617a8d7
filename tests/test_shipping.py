"""Shipped agents (utils/shipping.py, 06 --ship / --agent): a half-precision file that loads without running
code, plays like the run it came from, and is scored as shipped."""

import json
import os
import shutil

import torch
from PIL import Image

import subprocess
import sys

from conftest import ROOT, assert_ok, assert_user_error, run_script, write_config
from utils.checkpoints import read_checkpoint


def play_shipped(agent: str, *sets: str) -> subprocess.CompletedProcess:
    """06_evaluate.py --agent AGENT [--set ...]: no --config, the agent carries its own."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "06_evaluate.py"), "--agent", agent,
                           *(("--set", *sets) if sets else ())], cwd=ROOT, capture_output=True, text=True, timeout=300)


def copy_run(tiny_run, run_dir):
    for stage in ("rollouts", "vision", "latents", "mdnrnn", "controller"):
        shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / stage)


def test_ship_then_play_the_shipped_agent(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    copy_run(tiny_run, run_dir)
    config = write_config(tmp_path, run_dir, evaluate={"episodes": 2, "max_steps": 30, "fid_frames": 0})
    out = tmp_path / "agents" / "tiny"
    proc = run_script("06_evaluate", config, "--ship", str(out))
    assert_ok(proc)
    agent = torch.load(out / "agent.pt", map_location="cpu", weights_only=True)  # tensors and plain types only
    assert agent["kind"] == "agent" and agent["config"]["run_dir"] == str(run_dir)
    for part, folder, name in (("vision", "vision", "best.pt"), ("memory", "mdnrnn", "best.pt")):
        trained = read_checkpoint(str(run_dir / folder / name))["state_dict"]
        shipped = agent[part]["state_dict"]
        assert shipped.keys() == trained.keys()
        for key, value in shipped.items():  # float weights are the trained ones rounded to half precision
            assert value.dtype == (torch.float16 if trained[key].is_floating_point() else trained[key].dtype)
            torch.testing.assert_close(value, trained[key].to(value.dtype), rtol=0, atol=0)
    best = read_checkpoint(str(run_dir / "controller" / "controller.pt"))
    assert agent["controller"]["generation"] == best["generation"] and agent["controller"]["best"] == best["best"]
    scores = json.load(open(out / "scores.json"))  # the packed agent's own score, in <run_dir>/shipped
    assert scores == json.load(open(run_dir / "shipped" / "eval" / "scores.json")) and scores["episodes"] == 2
    readme = (out / "README.md").read_text()
    assert f"**{scores['mean']:.1f} +- {scores['std']:.1f}** over 2 held-out episodes" in readme
    assert f"--agent {out / 'agent.pt'}" in readme

    # anyone plays it from the file alone, on any number of held-out episodes
    watch = tmp_path / "watch"
    proc = play_shipped(str(out / "agent.pt"), f"run_dir={watch}", "evaluate.episodes=3")
    assert_ok(proc)
    played = json.load(open(watch / "eval" / "scores.json"))
    assert played["episodes"] == 3 and played["returns"][:2] == scores["returns"]  # the same seeds, the same agent
    gif = Image.open(watch / "eval" / "world_model.gif")
    assert gif.size == (3 * 64 * 2, 64 * 2) and gif.n_frames > 1  # real | reconstruction | dream, scaled 2x
    assert f"{played['mean']:.1f} +- {played['std']:.1f} over 3 held-out episodes" in proc.stdout

    # never unpacked over a run's own files; a checkpoint that is not an agent is named
    before = (run_dir / "vision" / "best.pt").read_bytes()
    proc = play_shipped(str(out / "agent.pt"), f"run_dir={run_dir}")
    assert_user_error(proc, str(run_dir), "not empty and not an unpacked agent")
    assert (run_dir / "vision" / "best.pt").read_bytes() == before
    assert_user_error(play_shipped(str(run_dir / "vision" / "best.pt")), "best.pt", "not a shipped agent")


def test_the_shipped_agents_in_the_repository():
    """agents/*/agent.pt, what `make watch` plays: each loads with torch.load(weights_only=True) as a shipped agent
    in half precision, carries the score it was measured at (scores.json: the packed file on held-out seeds) and
    a README quoting it; together they stay within the 25 MB the repository allows them."""
    import glob
    import re

    from utils.shipping import read_agent

    makefile = open(os.path.join(ROOT, "Makefile")).read()
    watched = re.search(r"^WATCH_AGENT \?= (\S+)$", makefile, re.M).group(1)
    agents = sorted(glob.glob(os.path.join(ROOT, "agents", "*", "agent.pt")))
    assert os.path.join(ROOT, watched) in agents
    assert sum(os.path.getsize(p) for p in agents) <= 25 * 2**20
    for path in agents:
        agent = torch.load(path, map_location="cpu", weights_only=True)
        assert read_agent(path)["format"] == agent["format"]
        for part in ("vision", "memory", "controller"):
            weights = [v for v in agent[part]["state_dict"].values() if v.is_floating_point()]
            assert weights and all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in weights)
        scores = json.load(open(os.path.join(os.path.dirname(path), "scores.json")))
        assert scores["episodes"] == len(scores["returns"]) >= 100 and scores["env"] == agent["config"]["env"]["id"]
        readme = open(os.path.join(os.path.dirname(path), "README.md")).read()
        assert f"**{scores['mean']:.1f} +- {scores['std']:.1f}** over {scores['episodes']} held-out episodes" in readme
