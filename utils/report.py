"""Reports of stage 06: one run's eval/report.md, training curves, and the thesis-style comparison.

- `write_run_report`: the scores of one run (real env; dream too for a dream-trained
  controller), FID, the budget of every stage from its manifest, and the media.
- `plot_training_curves`: V's loss terms and M's negative log-likelihood per
  epoch (train and held-out), C's fitness per generation with the real-env
  re-evaluations, as one PNG.
- `compare_report`: several finished runs as the thesis's tables (Table 1 real
  CarRacing, Table 2 dream CarRacing, Table 3 PandaReach success, the FID
  figure), a row per run, our measured mean +- std beside the thesis's number,
  and the budget of each run.
"""

from __future__ import annotations

import csv
import json
import os

from utils.errors import UserError
from utils.io import atomic_path, read_manifest, save_text

STAGES = ("rollouts", "vision", "latents", "mdnrnn", "controller")

# The thesis's numbers (shared/seeds/002_*.txt; its README is 000_*.txt), by world model.
THESIS = {
    "real": {"vae": "720 +- 13", "nvae": "800 +- 18"},  # Table 1, CarRacing-v2, 100 trials
    "dream": {"vae": "694 +- 16", "nvae": "760 +- 18"},  # Table 2 (text: 696; README: 613 and 887)
    "fid": {"vae": "271.58", "nvae": "164.67"},  # README and abstract (section 4.2 says 174.67); N not stated
    "panda": {"vae": "-", "nvae": "95 %"},  # Table 3 (reached with a DDPG+HER state policy, see anchors)
}
THESIS_NOTES = [
    "Thesis numbers: Table 1 and Table 2 of the thesis (CarRacing-v2; its text gives 696 for the dream VAE, "
    "its README 613 and 887), its FID figure (README 164.67, section 4.2 174.67; image count not stated) and "
    "Table 3. Its public code fed the 32-d conv VAE, not the NVAE, to M and C (shared/guide/anchors.md).",
]


# ---------------------------------------------------------------------------------------------- one run

def budget_summary(run_dir: str) -> dict:
    """What each upstream stage cost, from its manifest: {stage: {"wall_s", "cpu_s" (or None), metrics...}};
    stages without a manifest are left out.

    A manifest times the last invocation of its stage; for 05, which is often resumed, wall_s is the
    sum of the per-generation seconds of history.csv instead (every invocation).
    """
    out = {}
    for name in STAGES:
        folder = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(folder, "manifest.json")):
            m = read_manifest(folder)
            out[name] = {"wall_s": m["wall_s"], "cpu_s": m.get("cpu_s"),
                         **{k: v for k, v in m["metrics"].items() if not isinstance(v, dict)}}
    history = _read_history(os.path.join(run_dir, "controller", "history.csv"))
    if "controller" in out and history:
        out["controller"]["wall_s"] = max(out["controller"]["wall_s"], sum(row["seconds"] for row in history))
    return out


def budget_totals(budget: dict) -> tuple[float, float | None]:
    """(wall hours, CPU hours) of stages 01-05; CPU hours is None when a manifest predates cpu_s."""
    wall = sum(b["wall_s"] for b in budget.values()) / 3600
    cpu = [b.get("cpu_s") for b in budget.values()]
    return wall, (sum(cpu) / 3600 if cpu and all(c is not None for c in cpu) else None)


def _fmt_hours(h: float | None) -> str:
    return "-" if h is None else f"{h:.2f}"


def fid_lines(fid: dict) -> list[str]:
    """The report's FID section: the numbers, or the one-line reason FID did not run."""
    if "skipped" in fid:
        return [fid["skipped"]]
    return [
        f"Over N = {fid['frames']} held-out real frames (InceptionV3 pool3, pytorch-fid):",
        "",
        "| V's images | FID against the real frames |",
        "| --- | --- |",
        f"| reconstructions decode(encode(x)) | {fid['recon']:.2f} |",
        f"| prior samples (tau 1) | {fid['prior']:.2f} |",
    ]


RANDOM_POLICY_FILE = "random_policy.json"  # eval/ of a run: benchmarks/random_policy.py's scores on the same seeds


def write_run_report(path: str, cfg, scores: dict, budget: dict, media: dict, fid: dict | None) -> None:
    """eval/report.md of one run (scores, FID, budget, media)."""
    c, r, m = cfg.controller, cfg.rollouts, cfg.memory
    memory = {"mdnrnn": f"MDN-RNN ({m.hidden} units, {m.gaussians} Gaussians)",
              "rssm": f"RSSM ({m.hidden} GRU units, {m.rssm.stoch}"
                      f"{f' x {m.rssm.classes} classes' if m.rssm.classes else ''} stochastic)",
              "tssm": f"TSSM ({m.tssm.layers} blocks of width {m.hidden}, context {m.tssm.context})"}[m.kind]
    trained = (f"C = actor-critic trained in M's imagination (horizon {c.actor_critic.horizon})" if c.kind == "actor_critic"
               else f"C = linear, trained with CMA-ES in the {c.env} env")
    lines = [
        f"# Evaluation: {cfg.run_dir}",
        "",
        f"World model: V = {cfg.vision.kind} (z = {cfg.vision.z_dim}), M = {memory}, {trained}.",
        "",
        "| env | episodes | mean +- std | min | max | controller params |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {cfg.env.id} | {scores['episodes']} | {scores['mean']:.1f} +- {scores['std']:.1f} | "
        f"{scores['min']:.1f} | {scores['max']:.1f} | {scores['params']} ({scores.get('params_unit', 'generation')} {scores['params_generation']}) |",
    ]
    if "dream" in scores:
        d = scores["dream"]
        lines.append(f"| dream (M at tau {d['temperature']:g}) | {d['episodes']} | {d['mean']:.1f} +- {d['std']:.1f} | "
                     f"{min(d['returns']):.1f} | {max(d['returns']):.1f} | same |")
    if "success_rate" in scores:
        lines += ["", f"Success rate (info[\"is_success\"] at the end of the episode): "
                      f"**{100 * scores['success_rate']:.0f} %** of {scores['episodes']} episodes. "
                      f"C sees {INPUT_NAMES[scores.get('inputs', 'z_h')]}."]
    if "goal_marker" in scores:
        g = scores["goal_marker"]
        lines += ["", f"Does z keep the goal? The goal marker shows in {100 * g['in_frames']:.0f} % of {g['frames']} "
                      f"held-out frames; V's reconstruction decode(mu(frame)) still shows it in "
                      f"{100 * g['in_reconstructions']:.0f} % of those."]
    if "position_heads" in scores:
        p = scores["position_heads"]
        lines += ["", f"V's position heads on {p['frames']} held-out frames (read from mu, against the recorded "
                      f"positions): goal {p['goal_cm']:.1f} cm, gripper {p['gripper_cm']:.1f} cm, goal minus gripper "
                      f"{p['offset_cm']:.1f} cm (mean errors); the goal within 5 cm in "
                      f"{100 * p['goal_within_5cm']:.0f} % of frames."]
        if "goal_depth_cm" in p:  # scores.json files written before this split lack it
            lines[-1] += (f" The goal's mean error across the first camera's image: {p['goal_across_cm']:.1f} cm; "
                          f"along its axis (depth): {p['goal_depth_cm']:.1f} cm.")
    lines += [
        "",
        f"Evaluation seeds {scores['seeds'][0]}..{scores['seeds'][-1]} are disjoint from every training seed "
        "(the `best` parameters were picked on stage 05's held-out re-evaluation episodes, which are not these "
        "either).",
    ]
    if fid is not None:
        lines += ["", "## FID", "", *fid_lines(fid)]
    lines += ["", "## Budget", "", "| stage | wall time (s) | CPU time (s) | size |", "| --- | --- | --- | --- |"]
    # What actually ran, from the manifests (a wall-time limit can stop 05 before controller.generations).
    sizes = {
        "rollouts": lambda b: f"{b.get('episodes_on_disk')} episodes ({r.policy} policy)",
        "vision": lambda b: f"{b.get('epochs')} epochs (best: {b.get('best_epoch')})",
        "latents": lambda b: f"{b.get('episodes')} episodes",
        "mdnrnn": lambda b: f"{b.get('epochs')} epochs (best: {b.get('best_epoch')})",
        "controller": lambda b: (f"{b.get('updates')} actor-critic updates, {b.get('dream_steps')} imagined steps, "
                                 f"{b.get('heldout_steps', '?')} held-out env steps"
                                 if b.get("kind") == "actor_critic" else
                                 f"{b.get('generations')} generations x {c.popsize} candidates x "
                                 f"{c.rollouts_per_candidate} rollouts, {b.get('env_steps')} env steps"
                                 + (f", {b.get('dream_steps')} dream steps" if b.get("dream_steps") else "")),
    }
    for name, b in budget.items():
        cpu = "-" if b.get("cpu_s") is None else f"{b['cpu_s']:.0f}"
        lines.append(f"| {name} | {b['wall_s']:.0f} | {cpu} | {sizes[name](b)} |")
    wall, cpu = budget_totals(budget)
    lines.append(f"| total 01-05 | {wall * 3600:.0f} ({wall:.2f} h) | {_fmt_hours(cpu)} h | |")
    lines += ["", "## Media", ""]
    for title, rel in media.items():
        lines += [f"![{title}]({rel})", ""]
    save_text(path, "\n".join(lines) + "\n")


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_history(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]


def plot_training_curves(run_dir: str, path: str) -> bool:
    """PNG with V's reconstruction NLL and KL, M's NLL (per epoch, train and held-out) and C's fitness
    per generation (best, mean +- std, real-env re-evaluations of the mean). Missing logs leave their
    panel empty; returns False (and writes nothing) when no stage has a log."""
    vision = _read_jsonl(os.path.join(run_dir, "vision", "train_log.jsonl"))
    mdnrnn = _read_jsonl(os.path.join(run_dir, "mdnrnn", "train_log.jsonl"))
    history = _read_history(os.path.join(run_dir, "controller", "history.csv"))
    if not (vision or mdnrnn or history):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from utils.cmaes_trainer import draw_fitness

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0, 0], vision, [("recon", "train"), ("val_recon", "held-out")], "V: reconstruction NLL (nats / frame)"),
        (axes[0, 1], vision, [("kl", "train"), ("val_kl", "held-out")], "V: KL (nats / frame)"),
        (axes[1, 0], mdnrnn, [("nll", "train"), ("val_nll", "held-out")], "M: negative log-likelihood of z' (nats / dim)"),
    ]
    for ax, log, keys, title in panels:
        for key, label in keys:
            points = [(row["epoch"], row[key]) for row in log if key in row]
            if points:
                ax.plot(*zip(*points), "o-", label=label, markersize=3)
        groups = sorted(k for k in (log[0] if log else {}) if k.startswith("val_kl_group"))
        if "KL" in title and groups:  # NVAE: held-out KL of each latent group
            for k in groups:
                ax.plot([row["epoch"] for row in log], [row[k] for row in log], ":", label=k[4:], linewidth=1)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    ax = axes[1, 1]
    if history and "update" in history[0]:  # the actor-critic's rows
        updates = [row["update"] for row in history]
        ax.plot(updates, [row["imagined_return"] for row in history], label="imagined lambda-return")
        ax.errorbar(updates, [row["heldout_mean"] for row in history], yerr=[row["heldout_std"] for row in history],
                    fmt="o-", capsize=3, label="held-out real return")
        ax.set_xlabel("imagination updates")
        ax.legend(loc="lower right", fontsize=7)
        ax.set_title("C: actor-critic in M's imagination", fontsize=10)
    elif history:
        env = "dream" if any(row.get("dream_steps") for row in history) else "training tracks"
        draw_fitness(ax, history, env)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="lower right", fontsize=7)
        ax.set_title("C: CMA-ES fitness per generation", fontsize=10)
    fig.suptitle(run_dir)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------- comparison

def load_run(run_dir: str) -> dict:
    """What the comparison needs from one evaluated run.

    Raises:
        UserError: no eval/scores.json or eval/manifest.json (stage 06 has not finished there).
    """
    scores_path = os.path.join(run_dir, "eval", "scores.json")
    if not os.path.isfile(scores_path):
        raise UserError(f"{scores_path}: not found; run 06_evaluate.py on {run_dir} first")
    with open(scores_path) as f:
        scores = json.load(f)
    cfg = read_manifest(os.path.join(run_dir, "eval"))["config"]
    fid_path = os.path.join(run_dir, "eval", "fid.json")
    fid = json.load(open(fid_path)) if os.path.isfile(fid_path) else None
    random_path = os.path.join(run_dir, "eval", RANDOM_POLICY_FILE)
    random = json.load(open(random_path)) if os.path.isfile(random_path) else None
    return {"run_dir": run_dir, "scores": scores, "config": cfg, "fid": fid, "budget": budget_summary(run_dir),
            "random_policy": random}


def round_runs(run_dir: str) -> list[dict]:
    """The finished rounds of an iterative run (utils/iterative.py) as runs of `load_run`, each with the wall and
    CPU hours of every round up to it ("totals": rounds.csv's per-round times summed)."""
    rows = {int(r["round"]): r for r in csv.DictReader(open(os.path.join(run_dir, "rounds.csv")))}
    out, wall, cpu = [], 0.0, 0.0
    for k in sorted(rows):
        wall += float(rows[k]["wall_s"]) / 3600
        cpu += float(rows[k]["cpu_s"]) / 3600
        run = load_run(os.path.join(run_dir, f"round_{k:02d}"))
        out.append({**run, "totals": (wall, cpu)})
    return out


def _table(run: dict) -> str:
    cfg = run["config"]
    if "Panda" in cfg["env"]["id"]:
        return "panda"
    return "dream" if cfg["controller"]["env"] == "dream" else "real"


def _budget_cells(run: dict) -> str:
    cfg, b = run["config"], run["budget"]
    c = cfg["controller"]
    wall, cpu = run.get("totals") or budget_totals(b)
    gens = b.get("controller", {}).get("generations", b.get("controller", {}).get("updates", "-"))
    where = f", tau {c.get('temperature', 1.0):g}" if c["env"] == "dream" else ""
    return [str(b.get("rollouts", {}).get("episodes_on_disk", "-")), str(b.get("vision", {}).get("epochs", "-")),
            str(b.get("mdnrnn", {}).get("epochs", "-")), f"{gens} x {c['popsize']} x {c['rollouts_per_candidate']}{where}",
            f"{wall:.2f}", _fmt_hours(cpu)]


BUDGET_HEADER = ["rollouts", "V epochs", "M epochs", "C: generations x population x rollouts", "wall h (01-05)",
                 "CPU h (01-05)"]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a markdown table (no header lines when `header` is empty: rows to append to one)."""
    lines = [f"| {' | '.join(header)} |", "|" + " --- |" * len(header)] if header else []
    return lines + [f"| {' | '.join(row)} |" for row in rows]


def _score(s: dict | None) -> str:
    return "-" if s is None else f"{s['mean']:.1f} +- {s['std']:.1f} ({s['episodes']})"


def _success(s: dict | None) -> str:
    return f"{100 * s['success_rate']:.0f} % ({s['episodes']})" if s and "success_rate" in s else "-"


INPUT_NAMES = {"z_h": "pixels: [z, h]", "z_h_proprio": "pixels + joint angles: [z, h, q]",
               "z_h_proprio_goal": "pixels + joint angles + goal from the state: [z, h, q, g] (upper bound)",
               "offset_proprio": "pixels (V's position heads) + joint angles: [(g^ - e^) / 10 cm, q - q0]",
               "offset": "pixels only (V's position heads): [(g^ - e^) / 10 cm]",
               "offset_kinematics_proprio": "pixels (V's goal head) + joint angles (V's joint kinematics): "
                                            "[(g^ - e(q)) / 10 cm, q - q0]",
               "state_offset_proprio": "the state's goal and gripper + joint angles: [(g - ee) / 10 cm, q - q0] "
                                       "(upper bound)"}


# (table, title, our columns, their cells for a run): the thesis's Tables 1-3.
TABLES = [
    ("real", "Table 1: CarRacing, controller trained in the real env", ["ours: score (episodes)"],
     lambda r: [_score(r["scores"])]),
    ("dream", "Table 2: dream CarRacing, controller trained inside M, scored in the real env",
     ["ours: real score (episodes)", "ours: dream score (episodes)"],
     lambda r: [_score(r["scores"]), _score(r["scores"].get("dream"))]),
    ("panda", "Table 3: PandaReach success rate", ["controller inputs", "ours: success (episodes)", "ours: return",
                                                   "random policy: success (episodes)"],
     lambda r: [INPUT_NAMES[r["config"]["controller"].get("inputs", "z_h")], _success(r["scores"]),
                f"{r['scores']['mean']:.1f} +- {r['scores']['std']:.1f}", _success(r["random_policy"])]),
]


def _kind(run: dict) -> str:
    v = run["config"]["vision"]
    return f"{'NVAE' if v['kind'] == 'nvae' else 'conv VAE'} (z = {v['z_dim']})"


def compare_report(run_dirs: list[str]) -> str:
    """Markdown mirroring the thesis's tables, one row per run, our measured numbers beside the thesis's.

    Raises:
        UserError: a run without stage 06's outputs.
    """
    runs, iterative = [], []
    for d in run_dirs:
        if os.path.isfile(os.path.join(d, "rounds.csv")):  # an iterative run: one row per finished round
            iterative.append(d)
            runs += round_runs(d)
        else:
            runs.append(load_run(d))
    by_table = {name: [r for r in runs if _table(r) == name] for name in ("real", "dream", "panda")}
    lines = ["# World Models with a conv VAE or an NVAE as V: measured numbers beside the thesis's", ""]
    lines += [f"Runs: {', '.join(f'`{d}`' for d in run_dirs)}. Scores are mean +- std over the episodes stated, on "
              "env seeds disjoint from every training seed (06_evaluate.py).", ""]
    for name, title, columns, cells in TABLES:
        if by_table[name]:
            header = ["world model", "run", *columns, "thesis", *BUDGET_HEADER]
            rows = [[_kind(r), f"`{r['run_dir']}`", *cells(r), THESIS[name][r["config"]["vision"]["kind"]],
                     *_budget_cells(r)] for r in by_table[name]]
            lines += [f"## {title}", "", *markdown_table(header, rows), ""]
    for d in iterative:
        table = [line for line in open(os.path.join(d, "rounds.md")).read().splitlines() if line.startswith("|")]
        lines += [f"## Iterative training: `{d}`", "", "Rows of the tables above: each round's C; its wall and CPU "
                  "hours are those of every round up to it.", "", *table, "", f"![real score against real-env steps]"
                  f"({os.path.join(d, 'rounds.png')})", ""]
    with_fid = [r for r in runs if r["fid"] is not None]
    lines += ["## FID of V against held-out real frames", ""]
    if with_fid:
        lines += markdown_table(["world model", "run", "N frames", "ours: reconstructions", "ours: prior samples",
                                 "thesis"], [])
        for r in with_fid:
            f = r["fid"]
            numbers = ["-", "not computed", "not computed"] if "skipped" in f else [
                str(f["frames"]), f"{f['recon']:.2f}", f"{f['prior']:.2f}"]
            lines += markdown_table([], [[_kind(r), f"`{r['run_dir']}`", *numbers,
                                          THESIS["fid"][r["config"]["vision"]["kind"]]]])
        reasons = sorted({r["fid"]["skipped"] for r in with_fid if "skipped" in r["fid"]})
        lines += ["", *reasons] if reasons else []
    else:
        lines.append("No run has eval/fid.json (evaluate.fid_frames was 0, or the runs predate FID).")
    lines += ["", "## Notes", "", *THESIS_NOTES, "",
              "CPU h: process CPU time of stages 01-05 (with their worker processes), from the manifests; '-' where a "
              "manifest predates that field. Training curves: eval/training_curves.png of each run."]
    return "\n".join(lines) + "\n"


def write_compare_report(run_dirs: list[str], path: str) -> str:
    """Write `compare_report(run_dirs)` to `path` (atomically: nothing is written when a run is not
    evaluated, UserError) and return the markdown."""
    text = compare_report(run_dirs)
    save_text(path, text)
    return text

