"""The typed config: strict keys, types, overrides, and clear errors naming the file and key."""

import pytest
import yaml

from utils.config import Config, config_from_dict, dump_config, load_config
from utils.errors import UserError


def write(tmp_path, data):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_and_shipped_configs_load():
    from models import build_vision

    for name in ("smoke", "carracing_vae", "carracing_vae_paper", "carracing_nvae", "carracing_nvae_paper",
                 "carracing_dream_vae", "carracing_dream_nvae"):
        cfg = load_config(f"configs/{name}.yaml")
        assert isinstance(cfg, Config) and cfg.env.id == "CarRacing-v3"
        assert build_vision(cfg).z_dim == cfg.vision.z_dim == (64 if name == "carracing_nvae_paper" else 32)
    assert load_config("configs/carracing_vae_paper.yaml").rollouts.episodes == 10_000
    paper = load_config("configs/carracing_nvae_paper.yaml").vision  # the thesis's Table 4
    assert (paper.nvae.channels, paper.nvae.num_flows, paper.nvae.spectral_lambda, paper.epochs) == (20, 2, 0.1, 1000)


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
        config_from_dict({"seed": True})


def test_resolved_config_round_trips():
    cfg = config_from_dict({"vision": {"z_dim": 12}}, overrides=["seed=5"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_ranges_and_shapes_are_checked(tmp_path):
    with pytest.raises(UserError, match=r"key 'controller.eval_every': expected a value > 0, got 0"):
        load_config(write(tmp_path, {"controller": {"eval_every": 0}}))
    with pytest.raises(UserError, match=r"key 'vision.holdout_fraction': expected a fraction"):
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

    argv = ["--config", "configs/smoke.yaml", "--set", "vision.epochs=2", "--set", "controller.popsize=8", "mdnrnn.epochs=3"]
    cfg = load_stage_config(stage_parser("test").parse_args(argv))
    assert (cfg.vision.epochs, cfg.controller.popsize, cfg.mdnrnn.epochs) == (2, 8, 3)
