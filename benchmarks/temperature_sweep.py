#!/usr/bin/env python
"""Temperature sweep of dream training (Ha & Schmidhuber section 4.5, their Doom table).

    python benchmarks/temperature_sweep.py --config configs/carracing_dream_vae.yaml \\
        --from runs/carracing_vae --taus 0.5 1.0 1.15 1.3 [--set controller.generations=40 ...]

For each tau: links V, M and the latents of a finished run (`--from`: its
rollouts/, vision/, latents/ and mdnrnn/, hard links, nothing copied) into
<run_dir>_tau<tau>, trains C inside M at that tau (stage 05 with
controller.env=dream, controller.temperature=tau), evaluates it (stage 06: real
held-out tracks, and dream episodes at the same tau), and prints one row per
tau: the dream score beside the real score, mean +- std, and the budget. The
table is also written to <run_dir>_sweep.md. Every stage resumes, so a killed
sweep continues where it stopped when run again; a tau whose eval/scores.json
is newer than its CMA-ES state is not evaluated again.

Raises (exit 2): a config whose controller.env is not dream, or a `--from` run
missing one of the four folders.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.cli import load_stage_config, run_stage, stage_parser  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io import read_manifest, save_text  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = ("rollouts", "vision", "latents", "mdnrnn")


def link_tree(src: str, dst: str) -> None:
    """Hard-link every file of `src` under `dst` (existing files are kept)."""
    for folder, _, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(folder, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            if not os.path.exists(os.path.join(target, name)):
                os.link(os.path.join(folder, name), os.path.join(target, name))


def run(script: str, config: list[str], sets: list[str]) -> None:
    """Run a stage script, streaming its output; a failure stops the sweep with the stage's exit code."""
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), "--config", *config, "--set", *sets]
    print("$", " ".join(cmd), flush=True)
    code = subprocess.call(cmd, cwd=ROOT)
    if code:
        raise SystemExit(code)


def sweep_row(run_dir: str) -> dict:
    """Scores and budget of one finished tau, from its eval/scores.json and manifests."""
    scores = json.load(open(os.path.join(run_dir, "eval", "scores.json")))
    m = read_manifest(os.path.join(run_dir, "controller"))["metrics"]
    with open(os.path.join(run_dir, "controller", "history.csv")) as f:
        seconds = sum(float(row["seconds"]) for row in csv.DictReader(f))
    return {
        "tau": scores["dream"]["temperature"], "dream": scores["dream"], "real": scores,
        "generations": m["generations"], "dream_steps": m["dream_steps"],
        "train_s": seconds,
    }


def table(rows: list[dict], cfg) -> str:
    c = cfg.controller
    lines = [
        f"Controller trained in the dream of {cfg.vision.kind} + MDN-RNN; CMA-ES population {c.popsize} x "
        f"{c.rollouts_per_candidate} dream rollouts of <= {c.max_steps or cfg.env.max_episode_steps} steps; "
        f"the CMA-ES mean re-evaluated on {c.eval_episodes} held-out real tracks every {c.eval_every} generations; "
        f"06 plays `evaluate.params: {cfg.evaluate.params}`"
        + (" (the final CMA-ES mean: nothing picked in the real env)." if cfg.evaluate.params == "mean" else
           " (the mean with the best held-out re-evaluation)."),
        "",
        "| tau | dream score | real score (held-out tracks) | generations | dream steps | 05 wall (min) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        d, s = r["dream"], r["real"]
        lines.append(
            f"| {r['tau']:g} | {d['mean']:.1f} +- {d['std']:.1f} ({d['episodes']} episodes) | "
            f"{s['mean']:.1f} +- {s['std']:.1f} ({s['episodes']} episodes) | {r['generations']} | "
            f"{r['dream_steps']:,} | {r['train_s'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="a finished run with V, M and latents")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.5, 1.0, 1.15, 1.3])
    args = parser.parse_args(argv)
    cfg = load_stage_config(args)
    if cfg.controller.env != "dream":
        raise UserError(f"{' + '.join(args.config)}: controller.env must be dream for a temperature sweep, got {cfg.controller.env}")
    for name in UPSTREAM:
        if not os.path.isdir(os.path.join(args.source, name)):
            raise UserError(f"{args.source}/{name}: folder not found; --from needs a run finished through stage 04")
    rows = []
    for tau in args.taus:
        run_dir = f"{cfg.run_dir}_tau{tau:g}"
        for name in UPSTREAM:
            link_tree(os.path.join(args.source, name), os.path.join(run_dir, name))
        sets = [*args.set, f"run_dir={run_dir}", f"controller.temperature={tau:g}"]
        run("05_train_controller", args.config, sets)
        scores = os.path.join(run_dir, "eval", "scores.json")
        # cmaes_state.npz changes only when a generation ends (a resume with nothing to do rewrites controller.pt)
        state = os.path.join(run_dir, "controller", "cmaes_state.npz")
        if not (os.path.exists(scores) and os.path.getmtime(scores) > os.path.getmtime(state)):
            run("06_evaluate", args.config, sets)
        rows.append(sweep_row(run_dir))
        text = table(rows, cfg)
        save_text(f"{cfg.run_dir}_sweep.md", text)
        print(text, flush=True)


if __name__ == "__main__":
    run_stage(main)
