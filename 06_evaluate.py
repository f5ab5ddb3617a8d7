#!/usr/bin/env python
"""Stage 06: evaluate the trained controller on held-out tracks and write the report.

    python 06_evaluate.py --config configs/carracing_vae.yaml [--set evaluate.episodes=100]
    python 06_evaluate.py --compare runs/carracing_vae runs/carracing_nvae ... [--out runs/compare.md]

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

--compare builds one report from several evaluated runs, mirroring the
thesis's tables (utils/report.py), and writes it to --out.
"""

from __future__ import annotations

import os
import time

from utils.cli import load_stage_config, open_stage_dir, run_stage, stage_dir, stage_parser
from utils.config import config_to_dict
from utils.evaluation import evaluate_run, load_evaluated_agent
from utils.io import write_manifest
from utils.parallel import check_backend
from utils.report import write_compare_report


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[1], config_required=False)
    parser.add_argument("--vision", help="vision checkpoint (default: <run_dir>/vision/best.pt)")
    parser.add_argument("--mdnrnn", help="M's checkpoint, any memory kind (default: <run_dir>/mdnrnn/best.pt)")
    parser.add_argument("--controller", help="controller checkpoint (default: <run_dir>/controller/controller.pt)")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="evaluated runs to compare (no --config)")
    parser.add_argument("--out", default="runs/compare.md", help="where --compare writes its report")
    args = parser.parse_args(argv)
    if args.compare:
        write_compare_report(args.compare, args.out)
        print(f"[06] comparison of {len(args.compare)} runs: {args.out}")
        return
    if not args.config:
        parser.error("--config is required (or --compare RUN_DIR ...)")
    cfg = load_stage_config(args)
    paths = {
        "vision": args.vision or os.path.join(stage_dir(cfg, "vision"), "best.pt"),
        "mdnrnn": args.mdnrnn or os.path.join(stage_dir(cfg, "mdnrnn"), "best.pt"),
        "controller": args.controller or os.path.join(stage_dir(cfg, "controller"), "controller.pt"),
    }
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


if __name__ == "__main__":
    run_stage(main)
