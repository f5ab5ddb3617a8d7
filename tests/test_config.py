"""The typed config: strict keys, types, overrides, and clear errors naming the file and key."""

import pytest
import yaml

from utils.config import Config, config_from_dict, dump_config, load_config
from utils.errors import UserError


def write(tmp_path, data, name="exp.yaml"):
    """A config file holding `data` (with a run_dir, unless `data` sets one or is not a mapping)."""
    if isinstance(data, dict):
        data = {"run_dir": str(tmp_path / "run"), **data}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_and_shipped_configs_load():
    from utils.training import build_model

    for name in ("smoke", "carracing_vae", "carracing_vae_paper", "carracing_nvae", "carracing_nvae_paper",
                 "carracing_dream_vae", "carracing_dream_nvae"):
        cfg = load_config(f"configs/{name}.yaml")
        assert isinstance(cfg, Config) and cfg.env.id == "CarRacing-v3" and cfg.run_dir == f"runs/{name}"
        v = build_model("vision", cfg.vision.kind, cfg.vision.model_config(), frame_size=cfg.env.frame_size)
        assert v.z_dim == cfg.vision.z_dim == (64 if name == "carracing_nvae_paper" else 32)
    assert load_config("configs/carracing_vae_paper.yaml").rollouts.episodes == 10_000
    kinds = {"carracing_rssm_ac": ("CarRacing-v3", "rssm"), "carracing_tssm_ac": ("CarRacing-v3", "tssm"),
             "panda_reach_rssm_ac": ("PandaReachJointsDense-v3", "rssm")}
    for name, (env, memory) in kinds.items():  # the world-model blocks compose onto their task config
        cfg = load_config(f"configs/{name}.yaml")
        assert (cfg.env.id, cfg.memory.kind, cfg.controller.kind, cfg.run_dir) == (env, memory, "actor_critic",
                                                                                   f"runs/{name}")
    for kind in ("vae", "nvae"):  # iterative training: the same rounds on either V, C in the dream
        cfg = load_config(f"configs/carracing_iterative_{kind}.yaml")
        assert (cfg.vision.kind, cfg.controller.env, cfg.iterative.rounds) == (kind, "dream", 4)
    boot = load_config("configs/carracing_iterative_vae_boot.yaml")  # round 0's C bootstrapped in the real env
    assert (boot.iterative.bootstrap_generations, boot.evaluate.params, boot.run_dir) == (
        15, "mean", "runs/carracing_iterative_vae_boot")
    explore = load_config("configs/carracing_iterative_vae_explore.yaml")  # _boot with more exploration noise
    assert (explore.iterative.bootstrap_generations, explore.rollouts.action_noise, explore.run_dir) == (
        15, 0.3, "runs/carracing_iterative_vae_explore")
    nvae = load_config(["configs/panda_reach_nvae.yaml", "configs/blocks/panda_rssm_ac.yaml"])
    assert (nvae.vision.kind, nvae.memory.kind, nvae.memory.hidden, nvae.controller.updates) == ("nvae", "rssm", 128,
                                                                                                  1000)
    paper = load_config("configs/carracing_nvae_paper.yaml").vision  # the thesis's Table 4
    assert (paper.nvae.channels, paper.nvae.num_flows, paper.nvae.spectral_lambda, paper.epochs) == (20, 2, 0.1, 1000)


def test_the_panda_configs_load_and_the_kinematics_pair_differs_only_in_v():
    """Every configs/panda_reach_*.yaml loads and builds its V; the NVAE kinematics config is the VAE's best
    setup with V (and run_dir) changed, so their rows in the README compare V alone."""
    import dataclasses
    import glob

    from utils.training import build_model

    for path in sorted(glob.glob("configs/panda_reach_*.yaml")):
        cfg = load_config(path)
        assert cfg.env.id.startswith("PandaReach"), path
        build_model("vision", cfg.vision.kind, cfg.vision.model_config(), frame_size=cfg.env.frame_size)
    vae = load_config("configs/panda_reach_vae_kinematics_2views.yaml")
    nvae = load_config("configs/panda_reach_nvae_kinematics_2views.yaml")
    assert (nvae.vision.kind, nvae.vision.joint_kinematics, nvae.controller.inputs) == (
        "nvae", True, "offset_kinematics_proprio")
    assert dataclasses.replace(nvae, run_dir=vae.run_dir, vision=vae.vision) == vae
    assert dataclasses.replace(nvae.vision, kind="vae", epochs=vae.vision.epochs, batch_size=vae.vision.batch_size,
                               kl_tolerance=vae.vision.kl_tolerance, nvae=vae.vision.nvae) == vae.vision


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, {"vision": {"z_dimm": 32}})
    with pytest.raises(UserError, match=r"exp.yaml: unknown key 'vision.z_dimm'"):
        load_config(path)


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'visoin'"):
        load_config(write(tmp_path, {"visoin": {"z_dim": 32}}))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(UserError, match=r"key 'vision.epochs': expected int, got 'ten'"):
        load_config(write(tmp_path, {"vision": {"epochs": "ten"}}))


def test_bad_choice_is_named(tmp_path):
    with pytest.raises(UserError, match=r"key 'rollouts.policy': expected one of"):
        load_config(write(tmp_path, {"rollouts": {"policy": "brownain"}}))


def test_missing_file():
    with pytest.raises(UserError, match=r"nope.yaml: config file not found"):
        load_config("nope.yaml")


def test_overrides_typed_and_checked(tmp_path):
    path = write(tmp_path, {"vision": {"z_dim": 32}})
    cfg = load_config(path, ["vision.z_dim=16", "controller.sigma0=1", "env.crop_dashboard=true"])
    assert cfg.vision.z_dim == 16
    assert cfg.controller.sigma0 == 1.0 and isinstance(cfg.controller.sigma0, float)
    assert cfg.env.crop_dashboard is True
    with pytest.raises(UserError, match=r"unknown key 'controller.popsiz'"):
        load_config(path, ["controller.popsiz=8"])
    with pytest.raises(UserError, match=r"expected section.key=value"):
        load_config(path, ["controller.popsize"])


def test_bool_is_not_an_int():
    with pytest.raises(UserError, match="expected int"):
        config_from_dict({"run_dir": "r", "seed": True})


def test_resolved_config_round_trips():
    cfg = config_from_dict({"run_dir": "r", "vision": {"z_dim": 12}}, overrides=["seed=5"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_ranges_and_shapes_are_checked(tmp_path):
    with pytest.raises(UserError, match=r"key 'controller.eval_every': expected a value >= 1, got 0"):
        load_config(write(tmp_path, {"controller": {"eval_every": 0}}))
    with pytest.raises(UserError, match=r"key 'vision.holdout_fraction': expected a value < 1"):
        load_config(write(tmp_path, {"vision": {"holdout_fraction": 1.5}}))
    with pytest.raises(UserError, match="expected a mapping of sections at the top, got list"):
        load_config(write(tmp_path, [1, 2]))
    assert load_config(write(tmp_path, {"vision": {"lr": "1e-3"}})).vision.lr == 1e-3  # YAML reads 1e-3 as a string
    cfg = load_config(write(tmp_path, {"vision": {"kind": "nvae", "nvae": {"channels": 16}}}))
    assert cfg.vision.nvae.channels == 16
    with pytest.raises(UserError, match=r"unknown key 'vision.nvae.chanels'"):
        load_config(write(tmp_path, {"vision": {"nvae": {"chanels": 16}}}))


def test_cuda_where_there_is_none_is_a_clear_error():
    import torch

    from utils.training import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="vision.device=cuda but torch sees no CUDA device"):
            resolve_device("cuda")


def test_repeated_set_flags_accumulate():
    from utils.cli import load_stage_config, stage_parser

    argv = ["--config", "configs/smoke.yaml", "--set", "vision.epochs=2", "--set", "controller.popsize=8", "memory.epochs=3"]
    cfg = load_stage_config(stage_parser("test").parse_args(argv))
    assert (cfg.vision.epochs, cfg.controller.popsize, cfg.memory.epochs) == (2, 8, 3)


@pytest.mark.parametrize("value", ["1e400", ".nan", "-.inf"])
def test_numbers_must_be_finite(tmp_path, value):
    with pytest.raises(UserError, match=r"key 'vision.lr': expected a finite number"):
        load_config(write(tmp_path, {}), [f"vision.lr={value}"])


def test_empty_file_missing_run_dir_and_renamed_keys(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(UserError, match="empty.yaml: the config file is empty"):
        load_config(str(empty))
    with pytest.raises(UserError, match="key 'run_dir' is required"):
        load_config(write(tmp_path, {"run_dir": ""}))
    with pytest.raises(UserError, match="key 'vision.workers' was renamed to vision.threads"):
        load_config(write(tmp_path, {"vision": {"workers": 2}}))
    with pytest.raises(UserError, match=r"key 'mdnrnn' was renamed to memory \(M's section; memory.kind"):
        load_config(write(tmp_path, {"mdnrnn": {"hidden": 64}}))
    with pytest.raises(UserError, match=r"key 'controller.popsize': expected a value >= 2, got 1"):
        load_config(write(tmp_path, {"controller": {"popsize": 1}}))


def test_blocks_compose_left_to_right_and_through_base(tmp_path):
    base = write(tmp_path, {"seed": 1, "vision": {"z_dim": 16, "epochs": 3}}, "base.yaml")
    block = write(tmp_path, {"vision": {"epochs": 5}, "controller": {"env": "dream"}}, "block.yaml")
    cfg = load_config([base, block], ["seed=2"])
    assert (cfg.seed, cfg.vision.z_dim, cfg.vision.epochs, cfg.controller.env) == (2, 16, 5, "dream")
    child = write(tmp_path, {"base": ["base.yaml", "block.yaml"], "vision": {"epochs": 7}}, "child.yaml")
    assert load_config(child).vision.epochs == 7 and load_config(child).vision.z_dim == 16
    loop = write(tmp_path, {"base": "loop.yaml"}, "loop.yaml")
    with pytest.raises(UserError, match="'base' includes itself"):
        load_config(loop)


def test_the_dream_and_nvae_configs_are_their_differences():
    """carracing_dream_vae = carracing_vae + blocks/dream.yaml; carracing_nvae = carracing_vae + blocks/nvae.yaml."""
    import dataclasses

    vae = load_config("configs/carracing_vae.yaml")
    dream = load_config("configs/carracing_dream_vae.yaml")
    assert dream == load_config(["configs/carracing_vae.yaml", "configs/blocks/dream.yaml"],
                                ["run_dir=runs/carracing_dream_vae"])
    assert dataclasses.replace(dream, run_dir=vae.run_dir, controller=vae.controller) == vae
    assert (dream.controller.env, dream.controller.temperature) == ("dream", 1.15)
    nvae = load_config("configs/carracing_nvae.yaml")
    assert dataclasses.replace(nvae, run_dir=vae.run_dir, vision=vae.vision) == vae and nvae.vision.kind == "nvae"
    for name in ("carracing_dream_vae", "carracing_nvae", "carracing_dream_nvae"):
        keys = [line for line in open(f"configs/{name}.yaml") if line.strip() and not line.startswith("#")]
        assert len(keys) <= 3, f"configs/{name}.yaml should hold only its differences: {keys}"


def test_help_config_lists_every_key():
    import dataclasses
    import subprocess
    import sys
    import typing

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "02_train_nvae.py", "--help-config"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

    def keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    listed = {line.split(":")[0].strip() for line in proc.stdout.splitlines() if line.startswith("  ") and ": " in line
              and not line.startswith("      ")}
    expected = set(keys(Config))
    assert expected <= listed, sorted(expected - listed)
    assert "  vision.kind: str = 'vae'  [vae | nvae]" in proc.stdout  # allowed values from models.VISION_KINDS
    assert "  controller.popsize: int = 16  [>= 2]" in proc.stdout
