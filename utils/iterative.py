"""Iterative training (Ha & Schmidhuber 2018, section 5) as one resumable command.

    python -m utils.iterative --config configs/carracing_iterative_vae.yaml [--set iterative.rounds=4]
    make iterate CONFIG=configs/carracing_iterative_vae.yaml

Round k runs the six stages in <run_dir>/round_KK/, each as its own process, exactly as a user would
(`python 0N_*.py --config <run_dir>/iterative_config.yaml --set run_dir=<run_dir>/round_KK ...`):

- round 0 records `rollouts.episodes` episodes with `rollouts.policy` (the random policy), trains V and M,
  trains C in M (controller.env: dream, or controller.kind: actor_critic; with iterative.bootstrap_generations
  > 0, the linear C by CMA-ES in the real env for that many generations instead, whatever C kind the later
  rounds train) and plays it on held-out tracks;
- round k >= 1 starts from hard links of round k-1's episodes (and, unless iterative.refit_vision, of its V
  and latents), records `iterative.episodes` new episodes with round k-1's agent plus N(0,
  rollouts.action_noise^2) action noise, encodes them, fine-tunes round k-1's M on all episodes so far
  (iterative.memory_init: previous; or trains M anew), trains C in the new M only (from scratch, or from round
  k-1's C of the same kind with iterative.controller_init: previous: CMA-ES's mean, or the actor-critic
  continued as in Dreamer's online loop), and evaluates it;
- the last round's stages also take iterative.final_round_sets, e.g. an actor-critic in the final M
  (controller.kind=actor_critic) after CMA-ES rounds whose Cs recorded the data.

Only stages 01 and 06 (and the held-out re-evaluations of 05, for logging) play the real env. A stage is
done when its folder holds manifest.json; killed anywhere, the same command skips what is done and each
stage resumes itself. The first run writes the resolved config to <run_dir>/iterative_config.yaml; a later
run with another config is refused, naming the keys that differ.

After each round the driver writes <run_dir>/round_KK/round.json and <run_dir>/rounds.csv and rounds.md (one
row per finished round: real-env steps for data and for evaluation apart, dream steps, M's held-out NLL, the
previous round's M on this round's new episodes (NLL and reward correlation: how well the dream that trained
the acting C predicted what it then met), real and dream scores, wall and CPU time) and rounds.png (real score against the real-env steps consumed so far; with
`--baseline RUN_DIR`, a real-env CMA-ES run's held-out curve on the same axes).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import yaml

from utils.checkpoints import load_model
from utils.cli import run_stage, stage_parser
from utils.config import Config, config_from_dict, config_to_dict, dump_config, load_config, parse_overrides
from utils.errors import UserError
from utils.evaluation import memory_fit
from utils.io import list_episodes, load_episode, save_csv, save_json, save_text
from utils.training import check_memory_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (("rollouts", "01_generate_rollouts"), ("vision", "02_train_nvae"), ("latents", "03_encode_latents"),
         ("mdnrnn", "04_train_mdnrnn"), ("controller", "05_train_controller"), ("eval", "06_evaluate"))
ROUND_FIELDS = ["round", "controller", "episodes", "new_episodes", "data_steps", "c_real_steps", "eval_steps",
                "real_steps_total",
                "dream_steps", "m_heldout_nll", "prev_m_new_nll", "prev_m_new_reward_corr", "real_mean", "real_std", "real_episodes",
                "dream_mean", "dream_std", "wall_s", "cpu_s"]


def round_dir(cfg: Config, k: int) -> str:
    """<run_dir>/round_KK."""
    return os.path.join(cfg.run_dir, f"round_{k:02d}")


def episodes_after(cfg: Config, k: int) -> int:
    """Episodes on disk once round k has recorded its own: round 0's plus iterative.episodes per later round."""
    return cfg.rollouts.episodes + k * cfg.iterative.episodes


def round_overrides(cfg: Config, k: int) -> list[str]:
    """The --set overrides of round k's stages (on top of the run's resolved config); the last round's end with
    iterative.final_round_sets (with controller_init previous, a last-round C of another kind starts from
    scratch)."""
    it, here = cfg.iterative, round_dir(cfg, k)
    final = list(it.final_round_sets) if k == it.rounds - 1 else []
    sets = [f"run_dir={here}"]
    if k < it.rounds - 1:
        sets.append(f"evaluate.episodes={it.eval_episodes}")
    if k == 0:
        if it.bootstrap_generations:
            sets += ["controller.kind=linear", "controller.env=real",  # CMA-ES, whatever C the later rounds train
                     f"controller.generations={it.bootstrap_generations}",
                     f"controller.popsize={it.bootstrap_popsize}", "controller.rollouts_per_candidate=1",
                     f"controller.max_steps={it.bootstrap_max_steps}",
                     f"controller.early_stop_steps={it.bootstrap_early_stop_steps}"]
        return sets + final
    prev = round_dir(cfg, k - 1)
    sets += [f"rollouts.episodes={episodes_after(cfg, k)}", "rollouts.policy=controller",
             f"rollouts.controller={os.path.join(prev, 'controller', 'controller.pt')}"]
    if it.memory_init == "previous":
        sets += [f"memory.init_from={os.path.join(prev, 'mdnrnn', 'best.pt')}", f"memory.epochs={it.memory_epochs}"]
    if it.controller_init == "previous" and round_controller_kind(cfg, k - 1) == round_controller_kind(cfg, k):
        sets.append(f"controller.init_from={os.path.join(prev, 'controller', 'controller.pt')}")
    return sets + final


def round_controller_kind(cfg: Config, k: int) -> str:
    """The kind of C round k trains: linear for a real-env bootstrap (round 0), the kind iterative.final_round_sets
    sets for the last round, else controller.kind. With controller_init previous a round starts from the previous
    round's C only where the kinds match (else from scratch)."""
    it = cfg.iterative
    if k == 0 and it.bootstrap_generations:
        return "linear"
    if k == it.rounds - 1 and it.final_round_sets:
        return final_round_config(cfg).controller.kind
    return cfg.controller.kind


def link_files(src: str, dst: str, pattern: str) -> int:
    """Hard-link (copy across file systems) the files of `src` matching `pattern` into `dst` where missing;
    returns how many were added. Stages replace files by renaming, so a link never changes under a reader."""
    os.makedirs(dst, exist_ok=True)
    added = 0
    for path in sorted(glob.glob(os.path.join(src, pattern))):
        target = os.path.join(dst, os.path.basename(path))
        if os.path.basename(path) == ".lock" or os.path.exists(target):
            continue
        try:
            os.link(path, target)
        except OSError:  # another file system: copy, then rename into place (a killed copy leaves no file)
            shutil.copy2(path, target + ".tmp")
            os.replace(target + ".tmp", target)
        added += 1
    return added


def prepare_round(cfg: Config, k: int) -> None:
    """Round k >= 1 starts from round k-1's episodes, and from its V and latents unless V is refitted."""
    prev, here = round_dir(cfg, k - 1), round_dir(cfg, k)
    link_files(os.path.join(prev, "rollouts"), os.path.join(here, "rollouts"), "episode_*.npz")
    if not cfg.iterative.refit_vision:
        link_files(os.path.join(prev, "vision"), os.path.join(here, "vision"), "*")
        link_files(os.path.join(prev, "latents"), os.path.join(here, "latents"), "episode_*.npz")


def check_iterative_config(cfg: Config) -> None:
    """The procedure trains C in M only.

    Raises:
        UserError: controller.env real with the linear C; a refitted V with a fine-tuned M; a last round that
            starts from the previous round's C but changes its inputs or width; ensemble_fitness min without an ensemble M whose size divides
            rollouts_per_candidate; a disagreement penalty without an ensemble; stage 04's options
            (utils.training.check_memory_options); iterative.final_round_sets that do not parse, name a key the
            driver sets (run_dir, seed, iterative.*), give a config that any of the above refuses, or would
            replace the real-env bootstrap C of a single round.
    """
    if cfg.iterative.refit_vision and cfg.iterative.memory_init == "previous":
        raise UserError("iterative.memory_init: previous fine-tunes M on the z of the same V; with "
                        "iterative.refit_vision true every round has a new V, so set iterative.memory_init=scratch")
    check_round_config(cfg)
    if cfg.iterative.final_round_sets:
        final = final_round_config(cfg)
        check_round_config(final)
        if cfg.iterative.controller_init == "previous" and cfg.controller.kind == final.controller.kind and (
                cfg.controller.inputs != final.controller.inputs
                or cfg.controller.actor_critic.units != final.controller.actor_critic.units):
            raise UserError("iterative.final_round_sets: with iterative.controller_init previous the last round's C "
                            "starts from the previous round's, so it cannot change controller.inputs or "
                            "controller.actor_critic.units; set iterative.controller_init=scratch")


def final_round_config(cfg: Config) -> Config:
    """The run's config with iterative.final_round_sets applied (what the last round's C and 06 read).

    Raises:
        UserError: an override that does not parse or names a key the driver sets, an unknown key or a bad value,
            or a single round whose C is the real-env bootstrap.
    """
    it = cfg.iterative
    source = "iterative.final_round_sets"
    for key, _ in parse_overrides(list(it.final_round_sets)):
        if key in ("run_dir", "seed") or key.split(".")[0] == "iterative":
            raise UserError(f"{source}: {key!r} is set by the driver for every round; set it in the config instead")
    if it.rounds == 1 and it.bootstrap_generations:
        raise UserError(f"{source}: the only round's C is the real-env bootstrap (iterative.bootstrap_generations "
                        f"{it.bootstrap_generations}); set iterative.rounds >= 2")
    return config_from_dict(config_to_dict(cfg), source, list(it.final_round_sets))


def check_round_config(cfg: Config) -> None:
    """The C a round trains in M only: what check_iterative_config refuses of one round's config.

    Raises:
        UserError: the linear C with controller.env real; ensemble_fitness min or a disagreement penalty without
            a fitting ensemble M; stage 04's options (utils.training.check_memory_options).
    """
    if cfg.controller.kind == "linear" and cfg.controller.env != "dream":
        raise UserError("controller.env: iterative training trains C inside M only; set controller.env=dream "
                        "(or controller.kind=actor_critic)")
    cc, k = cfg.controller, cfg.memory.ensemble
    if cc.kind == "linear" and cc.ensemble_fitness == "min" and (k < 2 or cc.rollouts_per_candidate % k):
        raise UserError(f"controller.ensemble_fitness: min takes the worst of an ensemble M's members, so it needs "
                        f"memory.ensemble >= 2 dividing controller.rollouts_per_candidate; got {k} and "
                        f"{cc.rollouts_per_candidate}")
    if cc.kind == "linear" and cc.disagreement_penalty > 0 and k < 2:
        raise UserError(f"controller.disagreement_penalty: {cc.disagreement_penalty} compares the members of an "
                        f"ensemble M, so it needs memory.ensemble >= 2; got {k}")
    check_memory_options(cfg)


def pin_config(cfg: Config) -> str:
    """Write the resolved config to <run_dir>/iterative_config.yaml on the first run; on a later run, refuse a
    config that differs in anything but iterative.rounds (more rounds extend a run). Returns the file's path.

    Raises:
        UserError: a resumed run whose config differs (the differing keys named).
    """
    path = os.path.join(cfg.run_dir, "iterative_config.yaml")
    if os.path.exists(path):
        with open(path) as f:
            saved = yaml.safe_load(f)
        now = yaml.safe_load(dump_config(cfg))  # as written (YAML lists where the config holds tuples)
        diff = sorted(set(_differing_keys(saved, now)) - {"iterative.rounds"})
        if diff:
            raise UserError(f"{path}: this run was started with another config (differs in {', '.join(diff[:6])}); "
                            "use the same config to resume, or another run_dir")
    os.makedirs(cfg.run_dir, exist_ok=True)
    save_text(path, dump_config(cfg))
    return path


def _differing_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):  # keys in one only came or went with another code version
        out = []
        for key in set(a) & set(b):
            out += _differing_keys(a[key], b[key], f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def run_step(script: str, config_path: str, sets: list[str]) -> None:
    """Run one stage as its own process, its output going to ours.

    Raises:
        UserError: the stage failed (its own error line is above); rerunning the command resumes it.
    """
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), "--config", config_path, "--set", *sets]
    child = subprocess.Popen(cmd)
    stopped = []

    def stop(signum, frame):  # a terminated driver stops its stage too (else the stage's lock outlives us).
        stopped.append(signum)  # No child.wait() here: the handler runs inside the wait below, whose lock
        child.terminate()       # is not re-entrant (waiting here again deadlocked the driver)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        raise SystemExit(128 + stopped[0])
    if code:
        raise UserError(f"{script} exited with status {code} (its message is above); rerun the same command to "
                        "resume from there")


def _manifest(folder: str) -> dict | None:
    path = os.path.join(folder, "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def round_row(cfg: Config, k: int, real_steps_before: int) -> dict:
    """The row of rounds.csv for finished round k (see ROUND_FIELDS)."""
    here = round_dir(cfg, k)
    first = 0 if k == 0 else episodes_after(cfg, k - 1)
    new = [os.path.join(here, "rollouts", f"episode_{i:05d}.npz") for i in range(first, episodes_after(cfg, k))]
    data_steps = sum(len(load_episode(p, ("rewards",))["rewards"]) for p in new)
    manifests = {name: _manifest(os.path.join(here, name)) for name, _ in STEPS}
    own = {n: m for n, m in manifests.items() if m and os.path.normpath(m["config"]["run_dir"]) == os.path.normpath(here)}
    with open(os.path.join(here, "eval", "scores.json")) as f:
        scores = json.load(f)
    controller = manifests["controller"]["metrics"]
    eval_steps = int(controller.get("heldout_steps") or 0) + int(sum(scores["steps"]))
    c_real_steps = int(controller.get("env_steps") or 0) if controller.get("env") == "real" else 0  # bootstrap C
    dream = scores.get("dream") or {}
    fit = {"nll": None, "reward_corr": None}
    if k and not cfg.iterative.refit_vision:  # the M whose dream trained the acting C, on what that C then met
        # (episodes it never saw); with a refitted V the new latents are another V's z, so there is no such number
        prev_memory, _ = load_model(os.path.join(round_dir(cfg, k - 1), "mdnrnn", "best.pt"), "memory")
        fit = memory_fit(prev_memory, [os.path.join(here, "latents", os.path.basename(p)) for p in new], cfg)
    return {"round": k, "controller": controller_label(manifests["controller"]), "episodes": episodes_after(cfg, k),
            "new_episodes": len(new), "data_steps": data_steps,
            "c_real_steps": c_real_steps, "eval_steps": eval_steps,
            "real_steps_total": real_steps_before + data_steps + c_real_steps + eval_steps,
            "dream_steps": int(controller.get("dream_steps") or 0),
            "m_heldout_nll": manifests["mdnrnn"]["metrics"].get("val_nll"),
            "prev_m_new_nll": fit["nll"], "prev_m_new_reward_corr": fit["reward_corr"],
            "real_mean": scores["mean"], "real_std": scores["std"], "real_episodes": scores["episodes"],
            "dream_mean": dream.get("mean"), "dream_std": dream.get("std"),
            "wall_s": round(sum(m["wall_s"] for m in own.values()), 1),
            "cpu_s": round(sum(m.get("cpu_s") or 0.0 for m in own.values()), 1)}


def controller_label(manifest: dict) -> str:
    """How a round's C was trained, from its 05 manifest: 'CMA-ES in the real env', 'CMA-ES in M' or 'actor-critic
    in M', with ', continued' where it started from another C (controller.init_from)."""
    metrics = manifest["metrics"]
    if metrics.get("kind") == "actor_critic":
        label = "actor-critic in M"
    else:
        label = "CMA-ES in the real env" if metrics.get("env") == "real" else "CMA-ES in M"
    return label + (", continued" if manifest["config"]["controller"].get("init_from") else "")


def write_rounds(cfg: Config, rows: list[dict], baseline: str | None = None) -> None:
    """rounds.csv, rounds.md and rounds.png under run_dir."""
    save_csv(os.path.join(cfg.run_dir, "rounds.csv"), rows, ROUND_FIELDS)
    lines = [f"# Iterative training: {cfg.env.id}, V {cfg.vision.kind}, M {cfg.memory.kind}",
             "", "Real-env steps: data = the episodes recorded for V and M; C = the training episodes of a C trained "
             "in the real env (round 0 with iterative.bootstrap_generations > 0; else 0); evaluation = 05's held-out "
             "re-evaluations (logging only) + 06's held-out episodes. Time: the stages run in this round.", "",
             "M's NLL is of z_{t+1} in nats per latent dim: this round's M on its held-out episodes (stage 04's "
             "split of all episodes so far), and the previous round's M, whose dream trained the C that recorded "
             "this round's episodes, on those new episodes.", "",
             "| round | C | episodes (new) | real steps: data | real steps: C | real steps: evaluation | "
             "real steps so far | "
             "dream steps | M held-out NLL | previous M on the new episodes: NLL, reward r | real score | "
             "dream score | wall (min) | CPU (min) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        dream = "-" if r["dream_mean"] is None else f"{r['dream_mean']:.1f} +- {r['dream_std']:.1f}"
        nll = "-" if r["m_heldout_nll"] is None else f"{r['m_heldout_nll']:.3f}"
        prev = "-" if r["prev_m_new_nll"] is None else f"{r['prev_m_new_nll']:.3f}, " + (
            "-" if r["prev_m_new_reward_corr"] is None else f"{r['prev_m_new_reward_corr']:.3f}")
        lines.append(f"| {r['round']} | {r.get('controller') or '-'} | {r['episodes']} ({r['new_episodes']}) | "
                     f"{r['data_steps']:,} | "
                     f"{r.get('c_real_steps', 0):,} | "
                     f"{r['eval_steps']:,} | {r['real_steps_total']:,} | {r['dream_steps']:,} | {nll} | {prev} | "
                     f"{r['real_mean']:.1f} +- {r['real_std']:.1f} ({r['real_episodes']}) | {dream} | "
                     f"{r['wall_s'] / 60:.1f} | {r['cpu_s'] / 60:.1f} |")
    save_text(os.path.join(cfg.run_dir, "rounds.md"), "\n".join(lines) + "\n")
    plot_rounds(rows, os.path.join(cfg.run_dir, "rounds.png"), baseline)


def baseline_curve(run_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real-env CMA-ES run's held-out re-evaluations against its real-env steps so far (its rollouts, then
    every generation's episodes and re-evaluations; runs older than the heldout_steps column lack the latter):
    (steps, mean, std).

    Raises:
        UserError: the run has no controller/history.csv or rollouts manifest.
    """
    history = os.path.join(run_dir, "controller", "history.csv")
    if not os.path.exists(history) or _manifest(os.path.join(run_dir, "rollouts")) is None:
        raise UserError(f"--baseline {run_dir}: expected a finished run with controller/history.csv and "
                        "rollouts/manifest.json")
    rows = list(csv.DictReader(open(history)))
    steps = sum(len(load_episode(p, ("rewards",))["rewards"]) for p in list_episodes(os.path.join(run_dir, "rollouts")))
    xs, means, stds = [], [], []
    for r in rows:
        steps += int(float(r["env_steps"] or 0)) + int(float(r.get("heldout_steps") or 0))
        if r["heldout_mean"]:
            xs.append(steps)
            means.append(float(r["heldout_mean"]))
            stds.append(float(r["heldout_std"]))
    return np.array(xs), np.array(means), np.array(stds)


def plot_rounds(rows: list[dict], path: str, baseline: str | None = None) -> None:
    """rounds.png: each round's real score (mean +- std) against the real-env steps consumed so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar([r["real_steps_total"] for r in rows], [r["real_mean"] for r in rows],
                yerr=[r["real_std"] for r in rows], fmt="o-", capsize=3, label="iterative: C trained in M only")
    for r in rows:
        ax.annotate(f"round {r['round']}", (r["real_steps_total"], r["real_mean"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    if baseline:
        xs, means, stds = baseline_curve(baseline)
        ax.errorbar(xs, means, yerr=stds, fmt="s--", capsize=2, alpha=0.7, label="CMA-ES in the real env (held-out)")
    ax.set_xlabel("real-env steps consumed (data + C training + evaluation)")
    ax.set_ylabel("held-out real return")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="RUN_DIR", help="a real-env CMA-ES run to draw beside the rounds")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    check_iterative_config(cfg)
    if args.baseline:
        baseline_curve(args.baseline)  # a bad baseline stops us before any work
    config_path = pin_config(cfg)
    rows, real_steps = [], 0
    for k in range(cfg.iterative.rounds):
        here = round_dir(cfg, k)
        if k:
            prepare_round(cfg, k)
        sets = round_overrides(cfg, k)
        for name, script in STEPS:
            if _manifest(os.path.join(here, name)) is not None:
                continue
            print(f"[iterate] round {k}/{cfg.iterative.rounds - 1}: {script} -> {os.path.join(here, name)}", flush=True)
            start = time.perf_counter()
            run_step(script, config_path, sets)
            print(f"[iterate] round {k}: {script} done in {time.perf_counter() - start:.0f} s", flush=True)
        cached = os.path.join(here, "round.json")  # a finished round's row: computed once
        if os.path.exists(cached):
            with open(cached) as f:
                row = {"c_real_steps": 0, "controller": None, **json.load(f)}  # rows from before those columns
        else:
            row = round_row(cfg, k, real_steps)
            save_json(cached, row)
        real_steps = row["real_steps_total"]
        rows.append(row)
        write_rounds(cfg, rows, args.baseline)
        print(f"[iterate] round {k}: real {row['real_mean']:.1f} +- {row['real_std']:.1f} ({row['real_episodes']} "
              f"held-out episodes), {real_steps:,} real-env steps so far; {os.path.join(cfg.run_dir, 'rounds.md')}",
              flush=True)


if __name__ == "__main__":
    run_stage(main)
