#!/usr/bin/env python
"""Stage 06: evaluate the trained controller on held-out tracks and write the report.

    python 06_evaluate.py --config configs/carracing_vae.yaml [--set evaluate.episodes=100]
    python 06_evaluate.py --compare runs/carracing_vae runs/carracing_nvae ... [--out runs/compare.md]
    python 06_evaluate.py --config CFG --ship agents/carracing_vae     # pack the run's V, M, C; score the pack
    python 06_evaluate.py --agent agents/carracing_vae/agent.pt [--set evaluate.episodes=100 run_dir=DIR]

Plays evaluate.episodes full episodes (no early stop) on env seeds from the
"evaluate" stream, disjoint from every training seed (utils/seeding.py), and
writes <run_dir>/eval/: scores.json (per-episode returns, mean, std, seeds),
report.md, episode.gif (the frame beside V's reconstruction, for the first
evaluation episode) and reconstructions.png (held-out frames over their
reconstructions), training_curves.png (V, M and C per epoch / generation)
and fid.json (FID of V's reconstructions and prior samples against
evaluate.fid_frames held-out frames, through the optional pytorch-fid extra;
without it, one line says what is missing and the rest is still written). For
a controller trained in the dream (controller.env: dream), also dream.gif:
that real episode beside a dream started from its
first frame, driven by the same controller and decoded through V. Where
stage 03's latents exist, scores.json also holds C's score in M's dream at
controller.temperature, whichever env C was trained in.

Every run also gets world_model.gif: the first evaluation episode's real
frames beside V's reconstructions and beside M's dream from its first frame,
driven by the same C.

--compare builds one report from several evaluated runs, mirroring the
thesis's tables (utils/report.py), and writes it to --out; an iterative run
(utils/iterative.py) contributes one row per round.

--ship DIR packs the run's V, M and C (evaluate.params) in half precision into
DIR/agent.pt (utils/shipping.py), then evaluates that packed agent in
<run_dir>/shipped/ and writes DIR/scores.json and DIR/README.md with the score
the shipped file itself reached. --agent PATH evaluates a shipped agent with
the config it carries (plus --set), unpacked under run_dir (default
runs/shipped/<DIR name>).
"""

from __future__ import annotations

import json
import os
import time

from utils.cli import check_writable, load_stage_config, open_stage_dir, run_stage, stage_dir, stage_parser
from utils.config import config_from_dict, config_to_dict
from utils.errors import UserError
from utils.evaluation import evaluate_run, load_evaluated_agent
from utils.io import save_json, save_text, write_manifest
from utils.parallel import check_backend
from utils.report import write_compare_report
from utils.shipping import pack_agent, read_agent, save_agent, unpack_agent


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[1], config_required=False)
    parser.add_argument("--vision", help="vision checkpoint (default: <run_dir>/vision/best.pt)")
    parser.add_argument("--mdnrnn", help="M's checkpoint, any memory kind (default: <run_dir>/mdnrnn/best.pt)")
    parser.add_argument("--controller", help="controller checkpoint (default: <run_dir>/controller/controller.pt)")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="evaluated runs to compare (no --config)")
    parser.add_argument("--out", default="runs/compare.md", help="where --compare writes its report")
    parser.add_argument("--ship", metavar="DIR", help="pack the run's agent into DIR/agent.pt and score the pack")
    parser.add_argument("--agent", metavar="PATH", help="evaluate a shipped agent.pt (no --config needed)")
    args = parser.parse_args(argv)
    if args.compare:
        write_compare_report(args.compare, args.out)
        print(f"[06] comparison of {len(args.compare)} runs: {args.out}")
        return
    if args.agent:
        if args.config:
            parser.error("--agent plays the shipped agent with the config it carries; drop --config (use --set)")
        evaluate_shipped(args.agent, args.set)
        return
    if not args.config:
        parser.error("--config is required (or --compare RUN_DIR ..., or --agent PATH)")
    cfg = load_stage_config(args)
    paths = {
        "vision": args.vision or os.path.join(stage_dir(cfg, "vision"), "best.pt"),
        "mdnrnn": args.mdnrnn or os.path.join(stage_dir(cfg, "mdnrnn"), "best.pt"),
        "controller": args.controller or os.path.join(stage_dir(cfg, "controller"), "controller.pt"),
    }
    if args.ship:
        ship(cfg, paths, args.ship)
        return
    evaluate(cfg, paths)


def evaluate(cfg, paths: dict[str, str]) -> dict:
    """Stage 06 on the V, M and C of `paths` (vision, mdnrnn, controller); returns the scores."""
    start = time.perf_counter()
    loaded = load_evaluated_agent(cfg, paths["vision"], paths["mdnrnn"], paths["controller"])  # checked first
    check_backend(cfg.backend)
    out_dir = open_stage_dir(cfg, "eval")
    scores, n_gif = evaluate_run(cfg, out_dir, paths["vision"], paths["mdnrnn"], paths["controller"], loaded)
    write_manifest(
        out_dir, "06_evaluate", config_to_dict(cfg), {k: os.path.abspath(p) for k, p in paths.items()},
        time.perf_counter() - start,
        {k: scores[k] for k in ("episodes", "mean", "std", "min", "max")} | {"gif_frames": n_gif},
    )
    print(f"[06] {cfg.env.id}: {scores['mean']:.1f} +- {scores['std']:.1f} over {scores['episodes']} held-out "
          f"episodes (min {scores['min']:.1f}, max {scores['max']:.1f}); report: {os.path.join(out_dir, 'report.md')}")
    if "success_rate" in scores:
        print(f"[06] success rate: {100 * scores['success_rate']:.0f} % of {scores['episodes']} held-out episodes")
    if "dream" in scores:
        d = scores["dream"]
        print(f"[06] dream (tau {d['temperature']:g}): {d['mean']:.1f} +- {d['std']:.1f} over {d['episodes']} dream episodes")
    return scores


def evaluate_shipped(path: str, overrides: list[str]) -> dict:
    """06 on a shipped agent: its own config plus `overrides`, unpacked under run_dir (default
    runs/shipped/<its folder's name>)."""
    agent = read_agent(path)
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    data = {**agent["config"], "run_dir": os.path.join("runs", "shipped", name)}
    cfg = config_from_dict(data, path, overrides)
    print(f"[06] shipped agent {path}: {cfg.env.id}, V {agent['vision']['kind']}, M {agent['memory']['kind']}, "
          f"C {agent['controller']['kind']}; unpacked into {cfg.run_dir}")
    return evaluate(cfg, unpack_into(agent, path, cfg.run_dir))


def unpack_into(agent: dict, source: str, run_dir: str) -> dict[str, str]:
    """Unpack a shipped agent under run_dir, which must be new, empty or an unpacked agent (agent.json): never
    over a run's own files.

    Raises:
        UserError: run_dir holds anything but an unpacked agent.
    """
    marker = os.path.join(run_dir, "agent.json")
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not os.path.exists(marker):
        raise UserError(f"{run_dir}: not empty and not an unpacked agent (no agent.json); unpack the shipped agent "
                        "elsewhere (--set run_dir=...)")
    check_writable(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    save_json(marker, {"agent": os.path.abspath(source)})  # first: a killed unpack can be redone
    return unpack_agent(agent, run_dir)


def ship(cfg, paths: dict[str, str], out: str) -> None:
    """Pack the run's agent into out/agent.pt, score the packed (half-precision) agent in <run_dir>/shipped, and
    write out/scores.json and out/README.md."""
    vision, mdnrnn, controller, ckpt = load_evaluated_agent(cfg, paths["vision"], paths["mdnrnn"], paths["controller"])
    agent = pack_agent(paths["vision"], paths["mdnrnn"], controller, ckpt, config_to_dict(cfg))
    agent_path = os.path.join(out, "agent.pt")
    print(f"[06] packed the agent of {cfg.run_dir} in half precision; scoring the packed agent")
    shipped_cfg = config_from_dict({**config_to_dict(cfg), "run_dir": os.path.join(cfg.run_dir, "shipped")}, out)
    scores = evaluate(shipped_cfg, unpack_into(agent, agent_path, shipped_cfg.run_dir))
    save_agent(agent_path, agent)  # only once scored: agent.pt, scores.json and README.md always belong together
    size_mb = os.path.getsize(agent_path) / 2**20
    trained = os.path.join(stage_dir(cfg, "eval"), "scores.json")
    save_json(os.path.join(out, "scores.json"), scores)
    lines = [f"# Shipped agent: {cfg.env.id}", "",
             f"V {vision.kind} (z {vision.z_dim}), M {mdnrnn.kind}, C {controller.kind} ({controller.inputs}), "
             f"trained in `{cfg.run_dir}`; weights in half precision ({size_mb:.1f} MB).", "",
             f"Score of this file: **{scores['mean']:.1f} +- {scores['std']:.1f}** over {scores['episodes']} held-out "
             "episodes (the evaluation seed stream), measured by "
             f"`06_evaluate.py --config <its config> --ship {out}`."]
    if "success_rate" in scores:
        lines.append(f"Success rate: {100 * scores['success_rate']:.0f} %.")
    if os.path.exists(trained):
        with open(trained) as f:
            full = json.load(f)
        lines.append(f"The float32 run scored {full['mean']:.1f} +- {full['std']:.1f} over {full['episodes']} episodes.")
    lines += ["", f"Play it: `06_evaluate.py --agent {agent_path} --set evaluate.episodes=N`."]
    save_text(os.path.join(out, "README.md"), "\n".join(lines) + "\n")
    print(f"[06] shipped {out}: {scores['mean']:.1f} +- {scores['std']:.1f} (the packed agent)")


if __name__ == "__main__":
    run_stage(main)
