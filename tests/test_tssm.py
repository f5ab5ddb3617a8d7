"""The TSSM as M: cached imagination against the whole-sequence computation, checkpoints, stages 04-06."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_ok, run_script, write_config
from models.tssm import TSSM, TSSMConfig, TSSMOptions, rotate
from utils.checkpoints import load_model, save_model
from utils.errors import UserError


def tssm(context=5):
    torch.manual_seed(0)
    return TSSM(TSSMConfig(hidden=16, tssm=TSSMOptions(layers=2, heads=2, context=context)), z_dim=3,
                action_dim=2).eval()


def test_cached_steps_equal_the_uncached_sequence_within_and_beyond_the_context():
    m = tssm(context=5)
    z, a = torch.randn(2, 12, 3), torch.randn(2, 12, 2)
    with torch.no_grad():
        full = m.sequence(z, a)  # every token attends to itself and the 4 before it
        state = m.initial_state(2)
        for t in range(12):
            state = m.transition(m.observe(state, z[:, t]), a[:, t])
            torch.testing.assert_close(state[1], full[:, t], atol=1e-5, rtol=1e-5)
    assert len(state) == 4 + 2 * 2 and state[4].shape == (2, 2, 5, 8) and bool(state[2].all()) and int(state[3][0]) == 12
    # the attention span matters: without the context limit the later outputs differ
    m.context = 12
    with torch.no_grad():
        unlimited = m.sequence(z, a)
    assert not torch.allclose(unlimited[:, -1], full[:, -1], atol=1e-3)


def test_rotary_positions_make_attention_depend_on_offsets_only():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    pos = torch.arange(4.0)
    scores = rotate(q, pos) @ rotate(k, pos).T
    shifted = rotate(q, pos + 100) @ rotate(k, pos + 100).T
    torch.testing.assert_close(scores, shifted, atol=1e-4, rtol=1e-4)


def test_imagine_reparameterises_and_the_loss_trains_every_head():
    m = tssm().train()
    state = m.transition(m.observe(m.initial_state(2), torch.randn(2, 3)), torch.randn(2, 2))
    z1 = m.imagine(state, 1.0, torch.Generator().manual_seed(0))[0]
    z2 = m.imagine(state, 1.0, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(z1, z2)
    z1.sum().backward()
    assert m.z_head.weight.grad.abs().sum() > 0
    m.zero_grad()
    z, a = torch.randn(3, 7, 3), torch.randn(3, 6, 2)
    terms = m.loss(z, a, torch.randn(3, 6), torch.zeros(3, 6), torch.ones(3, 6), torch.ones(3, 6))
    terms["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())


def test_round_trip_wrong_kind_and_bad_sizes(tmp_path):
    m = tssm()
    path = str(tmp_path / "tssm.pt")
    save_model(path, m)
    again, ckpt = load_model(path, "memory")
    assert isinstance(again, TSSM) and ckpt["kind"] == "tssm"
    z, a = torch.randn(1, 4, 3), torch.randn(1, 4, 2)
    torch.testing.assert_close(again.sequence(z, a), m.sequence(z, a))
    with pytest.raises(UserError, match="tssm.pt: checkpoint of kind 'tssm', expected a controller checkpoint"):
        load_model(path, "controller")
    with pytest.raises(ValueError, match="must split into memory.tssm.heads"):
        TSSM(TSSMConfig(hidden=10, tssm=TSSMOptions(heads=4)))


def test_stages_04_to_06_with_a_tssm_and_the_actor_critic(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    for stage in ("rollouts", "vision", "latents"):
        shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / stage)
    memory = {"kind": "tssm", "hidden": 16, "seq_len": 8, "batch_size": 4, "epochs": 1, "threads": 1,
              "tssm": {"layers": 1, "heads": 2, "context": 8}}
    controller = {"kind": "actor_critic", "updates": 2, "eval_every": 2, "eval_episodes": 1, "batch_windows": 2,
                  "workers": 1, "actor_critic": {"units": 16, "horizon": 3}}
    config = write_config(tmp_path, run_dir, memory=memory, controller=controller,
                          evaluate={"episodes": 2, "max_steps": 30, "workers": 1, "fid_frames": 0})
    for stage in ("04_train_mdnrnn", "05_train_controller", "06_evaluate"):
        assert_ok(run_script(stage, config))
    m, _ = load_model(str(run_dir / "mdnrnn" / "best.pt"), "memory")
    assert isinstance(m, TSSM)
    scores = json.load(open(run_dir / "eval" / "scores.json"))
    assert scores["episodes"] == 2 and np.isfinite(scores["mean"])
