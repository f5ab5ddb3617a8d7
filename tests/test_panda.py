"""PandaReach from pixels with joint control: frames, recorded extras, C's inputs (joint angles, V's position heads),
the project's goal marker, 01-06 end to end."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import NVAE_TINY, ROOT, STAGES, assert_ok, assert_user_error, run_script, write_config
from models.controller import LinearController, LinearControllerConfig
from utils.checkpoints import load_model
from utils.config import EnvConfig, load_config
from utils.envs import camera_axes, goal_marker_mask, make_env
from utils.episodes import RandomPolicy, run_episode
from utils.report import INPUT_NAMES

PANDA_ENV = {"id": "PandaReachJoints-v3", "frame_size": 64, "max_episode_steps": 50, "render_size": 84}
PANDA_HOME_POSE = np.array([0.0, 0.41, 0.0, -1.85, 0.0, 2.26, 0.79], dtype=np.float32)  # panda-gym's neutral joints


@pytest.fixture(scope="module")
def panda_env():
    env = make_env(EnvConfig(**PANDA_ENV))
    yield env
    env.close()


def test_frames_have_the_configured_size_and_show_the_goal(panda_env):
    centroids = []
    assert panda_env.env.observation_space.shape == (84, 84, 3)  # env.render() at render_size, inside the wrapper
    for seed in range(5):
        frame, info = panda_env.reset(seed=seed)
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8  # V-ready: resized to frame_size
        mask = goal_marker_mask(frame)
        assert mask.sum() >= 1, f"goal marker not visible at seed {seed}"
        centroids.append(np.argwhere(mask).mean(axis=0))
        assert info["proprio"].shape == (7,) and info["desired_goal"].shape == (3,)
    # the marker moves with the goal: five random goals do not land on one pixel
    assert np.ptp(np.array(centroids), axis=0).max() > 3


def test_frame_size_follows_the_config():
    env = make_env(EnvConfig(**{**PANDA_ENV, "render_size": 48}))
    env.reset(seed=0)
    rendered = env.env._frame()  # PandaPixels, below the resize to frame_size
    env.close()
    assert rendered.shape == (48, 48, 3) and env.env.observation_space.shape == (48, 48, 3)


def test_recorded_episode_holds_proprio_and_goal(panda_env):
    policy = RandomPolicy("uniform", panda_env.action_space)
    episode = run_episode(panda_env, policy, seed=3, max_steps=12, record=True).arrays
    T = len(episode["actions"])
    assert T == 12 and episode["obs"].shape == (T, 64, 64, 3)
    assert episode["actions"].shape == (T, 7)
    assert episode["proprio"].shape == (T, 7) and episode["proprio"].dtype == np.float32
    np.testing.assert_allclose(episode["proprio"][0], PANDA_HOME_POSE, atol=0.01)  # the pose the first frame shows
    assert np.abs(np.diff(episode["proprio"], axis=0)).max() > 1e-3  # the joints move with the actions
    assert episode["desired_goal"].shape == (T, 3)
    assert np.ptp(episode["desired_goal"], axis=0).max() == 0  # one goal per episode
    ee = episode["achieved_goal"]  # the end effector, in m: it moves with the joints
    assert ee.shape == (T, 3) and ee.dtype == np.float32 and np.ptp(ee, axis=0).max() > 1e-3
    _, info = panda_env.reset(seed=3)
    np.testing.assert_allclose(info["achieved_goal"], panda_env.unwrapped.robot.get_ee_position(), atol=1e-6)
    np.testing.assert_allclose(info["proprio_centred"], info["proprio"] - PANDA_HOME_POSE, atol=1e-6)  # q - q0, rad
    assert np.abs(info["proprio_centred"]).max() < 0.01  # every episode starts at the neutral pose
    np.testing.assert_allclose(ee[0], info["achieved_goal"])  # the recorded first frame's state


def test_controller_with_proprio_inputs():
    low, high = -np.ones(7), np.ones(7)
    c = LinearController.for_world_model(LinearControllerConfig("z_h_proprio"), 8 + 16, low, high,
                                         {"proprio": 7, "desired_goal": 3})
    assert c.in_dim == 8 + 16 + 7 and c.num_params == 7 * (31 + 1) and c.info_keys == ("proprio",)
    c.set_params(np.random.default_rng(0).normal(size=c.num_params))
    z, h, q = torch.randn(2, 8), torch.randn(2, 16), torch.randn(2, 7)
    zh = torch.cat([z, h], -1)  # M's features for the MDN-RNN
    a = c(zh, q)
    assert a.shape == (2, 7) and (a.abs() <= 1).all()
    # the proprio inputs are the last columns of W: zeroing them makes C ignore q
    params = c.get_params()
    params[: 7 * 31].reshape(7, 31)[:, 24:] = 0  # W is row-major (A, in_dim), then b
    c.set_params(params)
    torch.testing.assert_close(c(zh, q), c(zh, torch.zeros(2, 7)))
    with pytest.raises(ValueError, match="takes 31 inputs, got 24"):
        c(zh)
    again = LinearController(c.config, **c.sizes())
    assert again.inputs == "z_h_proprio" and again.in_dim == 31
    info = {"proprio": np.arange(7, dtype=np.float32), "desired_goal": np.array([7, 8, 9], dtype=np.float32)}
    torch.testing.assert_close(c.extra_inputs(info), torch.arange(7.0)[None])
    goal = LinearController.for_world_model(LinearControllerConfig("z_h_proprio_goal"), 8 + 16, low, high,
                                            {"proprio": 7, "desired_goal": 3})
    assert goal.in_dim == 8 + 16 + 10
    torch.testing.assert_close(goal.extra_inputs(info), torch.arange(10.0)[None])  # proprio, then the goal
    assert LinearController(LinearControllerConfig(), 32, low, high).extra_inputs(info) is None
    with pytest.raises(ValueError, match="need info\\['proprio'\\]"):
        LinearController.for_world_model(LinearControllerConfig("z_h_proprio"), 8 + 16, low, high, {})


PANDA_INFO_DIMS = {"proprio": 7, "proprio_centred": 7, "desired_goal": 3, "achieved_goal": 3}


def test_offset_inputs_read_the_goal_minus_the_gripper_in_10_cm_units():
    """offset_proprio: [(g^ - e^) / 0.1 m from V's position heads, q - q0]; offset: the offset alone;
    state_offset_proprio: the offset from the env's state. None of them reads M's features."""
    low, high = -np.ones(7), np.ones(7)
    make = lambda inputs, dims=PANDA_INFO_DIMS: LinearController.for_world_model(  # noqa: E731
        LinearControllerConfig(inputs), 8 + 16, low, high, dims)
    c = make("offset_proprio")
    assert c.in_dim == 3 + 7 and c.num_params == 7 * 11 and c.reads_positions and not c.features_only
    positions = torch.tensor([[[0.1, -0.05, 0.2], [0.0, 0.0, 0.25]]])  # goal, gripper (m)
    info = {"proprio_centred": np.arange(7, dtype=np.float32), "desired_goal": np.array([0.3, 0, 0], np.float32),
            "achieved_goal": np.zeros(3, np.float32)}
    torch.testing.assert_close(c.extra_inputs(info, positions), torch.tensor([[1.0, -0.5, -0.5, *range(7)]]))
    c.set_params(np.random.default_rng(0).normal(size=c.num_params))
    extra = c.extra_inputs(info, positions)
    torch.testing.assert_close(c(torch.randn(1, 24), extra), c(torch.randn(1, 24), extra))  # features unread
    w, b = c.params[:70].reshape(7, 10), c.params[70:]
    torch.testing.assert_close(c(torch.zeros(1, 24), extra), torch.tanh(extra @ w.T + b))  # joint bounds [-1, 1]
    pixels = make("offset")
    assert pixels.in_dim == 3 and pixels.info_keys == ()
    torch.testing.assert_close(pixels.extra_inputs({}, positions), torch.tensor([[1.0, -0.5, -0.5]]))
    state = make("state_offset_proprio")
    assert state.in_dim == 10 and not state.reads_positions
    assert state.info_keys == ("desired_goal", "achieved_goal", "proprio_centred")
    torch.testing.assert_close(state.extra_inputs(info), torch.tensor([[3.0, 0.0, 0.0, *range(7)]]))
    assert make("z_h").features_only and not make("z_h_proprio").features_only
    with pytest.raises(ValueError, match="need info\\['proprio_centred'\\]"):
        make("offset_proprio", {"proprio": 7})


def test_position_heads_loss_is_the_gaussian_nll_of_the_recorded_positions():
    """Both V kinds: `positions` = -log N(target; heads(z), std^2) summed over the 6 coordinates (against
    torch.distributions), added to `loss`; goal_cm and gripper_cm read from mu; a V without heads ignores
    positions and refuses `positions(z)`."""
    import dataclasses

    from models.hparams import config_from_dict
    from models.nvae import NVAE, NVAEConfig
    from models.vae import ConvVAE, VAEConfig, position_nll

    torch.manual_seed(0)
    x = torch.rand(4, 3, 64, 64)
    target = torch.rand(4, 2, 3) * 0.3
    keys = {f.name for f in dataclasses.fields(NVAEConfig)}
    nvae_config = config_from_dict(NVAEConfig, {**{k: v for k, v in NVAE_TINY.items() if k in keys},
                                                "position_heads": True, "position_std": 0.02})
    for vision in (ConvVAE(VAEConfig(z_dim=8, position_heads=True, position_std=0.02)), NVAE(nvae_config)):
        vision.eval()
        mu, _ = vision.encode(x)
        predicted = vision.positions(mu)
        assert predicted.shape == (4, 2, 3) and predicted.dtype == torch.float32
        torch.manual_seed(1)
        with_heads = vision.loss(x, positions=target)
        torch.manual_seed(1)
        without = vision.loss(x)
        assert set(with_heads) - set(without) == {"positions", "goal_cm", "gripper_cm"}
        # the difference of two float32 totals: good to a few ulp of the total, not of the difference
        torch.testing.assert_close(with_heads["loss"] - without["loss"], with_heads["positions"], rtol=0,
                                   atol=1e-6 * float(without["loss"].abs()) + 1e-5)
        errors = 100 * (predicted - target).norm(dim=-1).mean(0)
        torch.testing.assert_close(torch.stack([with_heads["goal_cm"], with_heads["gripper_cm"]]), errors)
        # the NLL term, for z = mu exactly (position_nll is what `positions` averages, on a sampled z)
        expected = -torch.distributions.Normal(predicted, 0.02).log_prob(target).flatten(1).sum(1)
        torch.testing.assert_close(position_nll(predicted, target, 0.02), expected)
        assert with_heads["positions"].requires_grad
    plain = ConvVAE(VAEConfig(z_dim=8))
    assert set(plain.loss(x, positions=target)) == {"loss", "recon", "kl", "neg_elbo"}
    with pytest.raises(ValueError, match="no position heads"):
        plain.positions(torch.zeros(1, 8))


def test_joint_kinematics_loss_reads_and_refusals():
    """Both V kinds with vision.joint_kinematics: `kinematics` = -log N(gripper; e(q), std^2) summed over 3
    coordinates (against torch.distributions), added to `loss`, with kinematics_cm its error; positions(z, q)
    keeps the heads' goal and puts e(q) in the gripper's place; a V without it refuses q; it needs the heads."""
    import dataclasses

    from models.hparams import config_from_dict
    from models.nvae import NVAE, NVAEConfig
    from models.vae import ConvVAE, VAEConfig

    torch.manual_seed(0)
    x, q = torch.rand(4, 3, 64, 64), torch.rand(4, 7) * 2 - 1
    target = torch.rand(4, 2, 3) * 0.3
    keys = {f.name for f in dataclasses.fields(NVAEConfig)}
    nvae_config = config_from_dict(NVAEConfig, {**{k: v for k, v in NVAE_TINY.items() if k in keys},
                                                "position_heads": True, "joint_kinematics": True, "position_std": 0.02})
    for vision in (ConvVAE(VAEConfig(z_dim=8, position_heads=True, joint_kinematics=True, position_std=0.02)),
                   NVAE(nvae_config)):
        vision.eval()
        mu, _ = vision.encode(x)
        gripper = vision.joint_kinematics(q)
        assert gripper.shape == (4, 3) and gripper.dtype == torch.float32
        both = vision.positions(mu, q)
        torch.testing.assert_close(both[:, 0], vision.positions(mu)[:, 0])
        torch.testing.assert_close(both[:, 1], gripper)
        torch.manual_seed(1)
        with_q = vision.loss(x, positions=target, proprio=q)
        torch.manual_seed(1)
        without = vision.loss(x, positions=target)
        assert set(with_q) - set(without) == {"kinematics", "kinematics_cm"}
        expected = -torch.distributions.Normal(gripper, 0.02).log_prob(target[:, 1]).sum(1).mean()
        torch.testing.assert_close(with_q["kinematics"], expected)
        torch.testing.assert_close(with_q["loss"] - without["loss"], expected, rtol=1e-4, atol=1e-3)  # loss ~1e4
        torch.testing.assert_close(with_q["kinematics_cm"], 100 * (gripper - target[:, 1]).norm(dim=-1).mean())
    heads_only = ConvVAE(VAEConfig(z_dim=8, position_heads=True))
    with pytest.raises(ValueError, match="no joint kinematics"):
        heads_only.positions(torch.zeros(1, 8), torch.zeros(1, 7))
    with pytest.raises(ValueError, match="needs vision.position_heads"):
        ConvVAE(VAEConfig(z_dim=8, joint_kinematics=True))


def test_offset_kinematics_controller_reads_the_gripper_from_the_joint_angles():
    """offset_kinematics_proprio: [(g^ - e(q)) / 0.1 m, q - q0] with g^ from V's heads on z and e(q) from V's joint
    kinematics on info['proprio']; the agent hands V the joint angles, and C's action is tanh(W x + b) of them."""
    from models.agent import Agent
    from models.mdnrnn import MDNRNN, MDNRNNConfig
    from models.vae import ConvVAE, VAEConfig

    torch.manual_seed(0)
    low, high = -np.ones(7), np.ones(7)
    vision = ConvVAE(VAEConfig(z_dim=8, position_heads=True, joint_kinematics=True)).eval()
    memory = MDNRNN(MDNRNNConfig(hidden=16), z_dim=8, action_dim=7).eval()
    c = LinearController.for_world_model(LinearControllerConfig("offset_kinematics_proprio"), memory.feature_dim,
                                         low, high, PANDA_INFO_DIMS)
    assert c.in_dim == 10 and c.reads_positions and c.reads_joint_kinematics and not c.features_only
    assert c.info_keys == ("proprio", "proprio_centred")
    assert not LinearController.for_world_model(LinearControllerConfig("offset_proprio"), memory.feature_dim, low,
                                                high, PANDA_INFO_DIMS).reads_joint_kinematics
    c.set_params(np.random.default_rng(0).normal(size=c.num_params))
    frame = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    info = {"proprio": np.linspace(-1, 1, 7).astype(np.float32), "proprio_centred": np.arange(7, dtype=np.float32)}
    action = Agent(vision, memory, c).act(frame, info)
    with torch.no_grad():
        z = vision.encode(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255)[0]
        offset = (vision.positions(z)[:, 0] - vision.joint_kinematics(torch.from_numpy(info["proprio"])[None])) / 0.1
    x = torch.cat([offset, torch.arange(7.0)[None]], dim=1)
    w, b = c.params[:70].reshape(7, 10), c.params[70:]
    np.testing.assert_allclose(action, torch.tanh(x @ w.T + b)[0].numpy(), rtol=1e-4, atol=1e-5)


TINY_PANDA = {
    "env": {**PANDA_ENV, "id": "PandaReachMarkerJoints-v3", "goal_radius": 0.05, "render_shadows": False, "views": 2},
    "vision": {"position_heads": True},
    "rollouts": {"episodes": 3, "max_steps": 12, "policy": "uniform", "workers": 2},
    "memory": {"seq_len": 6},
    "controller": {"popsize": 4, "rollouts_per_candidate": 1, "generations": 1, "max_steps": 8,
                   "early_stop_steps": 0, "eval_every": 1, "eval_episodes": 1, "workers": 2},
    "evaluate": {"episodes": 3, "max_steps": 10, "workers": 2, "recon_frames": 4, "fid_frames": 0, "gif_every": 1},
}


@pytest.fixture(scope="module")
def panda_run(tmp_path_factory):
    """Stages 01-06 on the project's PandaReachMarkerJoints-v3 (marker radius 0.05, no shadows, two views) with a
    tiny budget, V with position heads, C on pixels only ([z, h])."""
    folder = tmp_path_factory.mktemp("panda")
    config = write_config(folder, folder / "run", **TINY_PANDA)
    outputs = {}
    for stage in STAGES:
        outputs[stage] = run_script(stage, config)
        assert_ok(outputs[stage])
    return {"config": config, "run_dir": str(folder / "run"), "folder": str(folder), "outputs": outputs}


def test_stages_end_to_end_on_panda_reach(panda_run):
    run_dir = panda_run["run_dir"]
    with np.load(os.path.join(run_dir, "rollouts", "episode_00000.npz")) as ep:
        assert ep["obs"].shape == (12, 64, 64, 3) and ep["actions"].shape == (12, 7)
        assert ep["proprio"].shape == (12, 7) and ep["desired_goal"].shape == (12, 3)
    c, ckpt = load_model(os.path.join(run_dir, "controller", "controller.pt"), "controller")
    assert ckpt["config"]["inputs"] == "z_h" and c.num_params == 7 * (8 + 16 + 1)
    scores = json.load(open(os.path.join(run_dir, "eval", "scores.json")))
    assert scores["env"] == "PandaReachMarkerJoints-v3" and scores["episodes"] == 3
    assert len(scores["successes"]) == 3 and scores["success_rate"] == np.mean(scores["successes"])
    assert all(-10 <= r <= 0 for r in scores["returns"])  # sparse reward: -1 per step until success, <= 10 steps
    assert f"success rate: {100 * scores['success_rate']:.0f} %" in panda_run["outputs"]["06_evaluate"].stdout
    report = open(os.path.join(run_dir, "eval", "report.md")).read()
    assert f"**{100 * scores['success_rate']:.0f} %** of 3 episodes" in report
    assert os.path.getsize(os.path.join(run_dir, "eval", "episode.gif")) > 0
    marker = scores["goal_marker"]
    assert marker["frames"] == 12 and marker["in_frames"] > 0.5  # the held-out episode's frames show the goal
    from utils.evaluation import goal_marker_visibility, held_out_frames  # recomputed here: the same share
    cfg = load_config(panda_run["config"])
    vision_path = os.path.join(run_dir, "vision", "best.pt")
    vision, _ = load_model(vision_path, "vision")
    assert marker == goal_marker_visibility(vision, held_out_frames(cfg, vision_path, 512))
    assert "goal marker" in report
    heads = scores["position_heads"]  # V's position heads on the held-out episode's frames, in cm
    assert heads["frames"] == 12 and all(np.isfinite(heads[k]) and heads[k] > 0 for k in ("goal_cm", "gripper_cm"))
    assert f"goal {heads['goal_cm']:.1f} cm" in panda_run["outputs"]["06_evaluate"].stdout
    across, depth, total = heads["goal_across_cm"], heads["goal_depth_cm"], heads["goal_cm"]  # parts of one error
    assert max(across, depth) <= total + 1e-6 and total <= across + depth + 1e-6 and "along its axis" in report
    log = [json.loads(line) for line in open(os.path.join(run_dir, "vision", "train_log.jsonl"))]
    assert {"positions", "goal_cm", "val_positions", "val_goal_cm", "val_gripper_cm"} <= set(log[-1])


def test_offset_controller_needs_a_v_with_position_heads(panda_run, tmp_path):
    """05 with controller.inputs=offset_proprio beside a V without position heads stops before writing anything."""
    plain = tmp_path / "no_heads"
    os.makedirs(plain / "vision")
    vision = torch.load(os.path.join(panda_run["run_dir"], "vision", "best.pt"), weights_only=True)
    vision["config"]["position_heads"] = False
    vision["state_dict"] = {k: v for k, v in vision["state_dict"].items() if not k.startswith("position_heads")}
    torch.save(vision, plain / "vision" / "best.pt")
    proc = run_script("05_train_controller", panda_run["config"], "--set", "controller.inputs=offset_proprio",
                      f"run_dir={plain}", "--mdnrnn", os.path.join(panda_run["run_dir"], "mdnrnn", "best.pt"))
    assert_user_error(proc, "controller.inputs", "no_heads/vision/best.pt", "position_heads")
    assert sorted(os.listdir(plain)) == ["vision"]


def test_joint_kinematics_end_to_end_and_its_refusals(panda_run, tmp_path):
    """02-06 with vision.joint_kinematics and controller.inputs=offset_kinematics_proprio on the tiny Panda
    episodes: V's log and 06 report the kinematics' error; 02 refuses joint_kinematics without the heads, and 05
    refuses that C beside a V without the kinematics, before writing anything."""
    run_dir = tmp_path / "kin"
    os.makedirs(run_dir)
    shutil.copytree(os.path.join(panda_run["run_dir"], "rollouts"), run_dir / "rollouts", copy_function=os.link)
    config = panda_run["config"]
    sets = ["--set", f"run_dir={run_dir}", "vision.joint_kinematics=true", "controller.inputs=offset_kinematics_proprio"]
    outputs = {stage: run_script(stage, config, *sets) for stage in STAGES[1:]}
    for proc in outputs.values():
        assert_ok(proc)
    log = [json.loads(line) for line in open(run_dir / "vision" / "train_log.jsonl")]
    assert {"kinematics", "kinematics_cm", "val_kinematics_cm"} <= set(log[-1])
    c, ckpt = load_model(str(run_dir / "controller" / "controller.pt"), "controller")
    assert ckpt["config"]["inputs"] == "offset_kinematics_proprio" and c.num_params == 7 * (3 + 7 + 1)
    scores = json.load(open(run_dir / "eval" / "scores.json"))
    heads = scores["position_heads"]
    assert scores["inputs"] == "offset_kinematics_proprio" and np.isfinite(heads["kinematics_cm"])
    assert f"gripper {heads['kinematics_cm']:.2f} cm" in outputs["06_evaluate"].stdout
    proc = subprocess.run([sys.executable, "benchmarks/panda_gripper_source.py", "--config", config, "--set",
                           f"run_dir={run_dir}", "--episodes", "2", "--sources", "heads,kinematics,state"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    swapped = json.load(open(run_dir / "eval" / "gripper_source.json"))
    assert [len(swapped[k]["episodes"]) for k in ("heads", "kinematics", "state")] == [2, 2, 2]
    assert swapped["state"]["gripper_error_cm"] == 0 and swapped["kinematics"]["gripper_error_cm"] > 0

    shutil.copytree(run_dir / "rollouts", tmp_path / "no_heads" / "rollouts", copy_function=os.link)
    proc = run_script("02_train_nvae", config, "--set", f"run_dir={tmp_path / 'no_heads'}",
                      "vision.joint_kinematics=true", "vision.position_heads=false")
    assert_user_error(proc, "vision.joint_kinematics", "vision.position_heads")
    assert os.listdir(tmp_path / "no_heads") == ["rollouts"]
    plain = tmp_path / "plain"
    proc = run_script("05_train_controller", config, "--set", f"run_dir={plain}",
                      "controller.inputs=offset_kinematics_proprio",
                      "--vision", os.path.join(panda_run["run_dir"], "vision", "best.pt"),
                      "--mdnrnn", os.path.join(panda_run["run_dir"], "mdnrnn", "best.pt"))
    assert_user_error(proc, "controller.inputs", "joint kinematics", "vision.joint_kinematics")
    assert not os.path.exists(plain / "controller")


def test_position_heads_need_position_labels(tiny_run, tmp_path):
    """02 with vision.position_heads on rollouts without achieved_goal (CarRacing's) stops before training."""
    os.makedirs(tmp_path / "car")
    shutil.copytree(os.path.join(tiny_run["run_dir"], "rollouts"), tmp_path / "car" / "rollouts",
                    copy_function=os.link)
    proc = run_script("02_train_nvae", tiny_run["config"], "--set", "vision.position_heads=true",
                      f"run_dir={tmp_path / 'car'}")
    assert_user_error(proc, "episode_00000.npz", "desired_goal and achieved_goal")
    assert not os.path.exists(tmp_path / "car" / "vision")


def test_offset_controller_end_to_end_and_table_3(panda_run):
    """05 and 06 with controller.inputs=offset_proprio (V's position heads and the joint angles) on the same V and
    M: C has 7 x (3 + 7 + 1) parameters; then the random baseline and the comparison report's Table 3. (The
    joint angles alone, z_h_proprio, go through the same info path: test_controller_with_proprio_inputs.)"""
    run_dir = os.path.join(panda_run["folder"], "offset")
    os.makedirs(run_dir)
    for stage in ("rollouts", "vision", "latents", "mdnrnn"):
        shutil.copytree(os.path.join(panda_run["run_dir"], stage), os.path.join(run_dir, stage))
    config = panda_run["config"]
    overrides = ["--set", "controller.inputs=offset_proprio", f"run_dir={run_dir}"]
    assert_ok(run_script("05_train_controller", config, *overrides))
    c, ckpt = load_model(os.path.join(run_dir, "controller", "controller.pt"), "controller")
    assert ckpt["config"]["inputs"] == "offset_proprio" and c.num_params == 7 * (3 + 7 + 1)
    assert_ok(run_script("06_evaluate", config, *overrides))
    scores = json.load(open(os.path.join(run_dir, "eval", "scores.json")))
    assert scores["inputs"] == "offset_proprio" and "success_rate" in scores and "dream" not in scores

    proc = subprocess.run([sys.executable, "benchmarks/random_policy.py", "--config", config, "--episodes", "20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    random = json.load(open(os.path.join(panda_run["run_dir"], "eval", "random_policy.json")))
    assert random["episodes"] == 20 and len(random["successes"]) == 20
    assert random["steps"] == [50 if not s else n for s, n in zip(random["successes"], random["steps"])]

    out = os.path.join(panda_run["folder"], "compare.md")
    assert_ok(run_script("06_evaluate", config, "--compare", panda_run["run_dir"], run_dir, "--out", out))
    text = open(out).read()
    table = text.split("## Table 3")[1].split("##")[0]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()
            if line.startswith("| conv VAE")]
    assert len(rows) == 2  # columns: world model, run, inputs, success, return, random policy's success, thesis, ...
    pixels = json.load(open(os.path.join(panda_run["run_dir"], "eval", "scores.json")))
    assert rows[0][2:6] == ["pixels: [z, h]", f"{100 * pixels['success_rate']:.0f} % (3)",
                            f"{pixels['mean']:.1f} +- {pixels['std']:.1f}", f"{100 * random['success_rate']:.0f} % (20)"]
    assert rows[1][2:6] == [INPUT_NAMES["offset_proprio"], f"{100 * scores['success_rate']:.0f} % (3)",
                            f"{scores['mean']:.1f} +- {scores['std']:.1f}", "-"]  # no random-policy file there
    assert rows[0][6] == rows[1][6] == "-"  # the thesis has no conv VAE number for Panda


AC_TINY = {"kind": "actor_critic", "updates": 2, "eval_every": 2, "eval_episodes": 1, "batch_windows": 2,
           "workers": 1, "actor_critic": {"units": 16, "horizon": 3}}


@pytest.mark.parametrize("vision, memory", [
    (None, {"kind": "rssm", "hidden": 16, "seq_len": 6, "rssm": {"stoch": 4, "units": 16}}),
    (NVAE_TINY, {"kind": "tssm", "hidden": 16, "seq_len": 6, "tssm": {"layers": 1, "heads": 2, "context": 6}}),
], ids=["vae-rssm", "nvae-tssm"])
def test_new_memory_kinds_and_the_actor_critic_on_panda_reach(panda_run, tmp_path, vision, memory):
    """Panda with an RSSM on the conv VAE and a TSSM on the NVAE, each with the actor-critic as C: stages
    04-06 (02-06 for the NVAE) on panda_run's rollouts."""
    run_dir = tmp_path / "run"
    kept = ("rollouts",) if vision else ("rollouts", "vision", "latents")
    for stage in kept:
        shutil.copytree(os.path.join(panda_run["run_dir"], stage), run_dir / stage)
    sections = {**TINY_PANDA, "memory": memory, "controller": AC_TINY}
    if vision:
        sections["vision"] = {**vision, "position_heads": True}  # the NVAE's heads, trained by 02
    config = write_config(tmp_path, run_dir, **sections)
    for stage in STAGES[1 if vision else 3:]:
        assert_ok(run_script(stage, config))
    m, _ = load_model(str(run_dir / "mdnrnn" / "best.pt"), "memory")
    c, _ = load_model(str(run_dir / "controller" / "controller.pt"), "controller")
    assert m.kind == memory["kind"] and c.kind == "actor_critic" and c.action_dim == 7
    scores = json.load(open(run_dir / "eval" / "scores.json"))
    assert scores["env"] == "PandaReachMarkerJoints-v3" and scores["episodes"] == 3 and scores["inputs"] == "z_h"
    assert scores["success_rate"] == np.mean(scores["successes"]) and np.isfinite(scores["mean"])


def test_proprio_inputs_need_a_real_panda_env(tmp_path):
    config = write_config(tmp_path, tmp_path / "car")  # the tiny CarRacing config: no proprio vector
    proc = run_script("05_train_controller", config, "--set", "controller.inputs=z_h_proprio")
    assert_user_error(proc, "controller.inputs", "CarRacing-v3")
    assert not os.path.exists(tmp_path / "car")
    config = write_config(tmp_path, tmp_path / "run", **TINY_PANDA)
    proc = run_script("05_train_controller", config, "--set", "controller.inputs=z_h_proprio", "controller.env=dream")
    assert_user_error(proc, "controller.inputs", "controller.env=dream")
    assert not os.path.exists(tmp_path / "run")


def marker_in_view(env) -> bool:
    """Whether any pixel of the rendered view belongs to the goal sphere (pybullet's segmentation mask, the
    env's own camera): the marker is in front of the arm and the table."""
    base = env.unwrapped
    client = base.sim.physics_client
    view = client.computeViewMatrixFromYawPitchRoll(cameraTargetPosition=base.render_target_position,
                                                    distance=base.render_distance, yaw=base.render_yaw,
                                                    pitch=base.render_pitch, roll=base.render_roll, upAxisIndex=2)
    projection = client.computeProjectionMatrixFOV(fov=60, aspect=1.0, nearVal=0.1, farVal=100.0)
    seg = client.getCameraImage(base.render_width, base.render_height, view, projection, shadow=False)[4]
    return bool((np.asarray(seg).reshape(base.render_height, base.render_width) == base.sim._bodies_idx["target"]).any())


def test_the_projects_reach_draws_the_marker_it_is_told_and_changes_nothing_else(panda_env):
    """PandaReachMarkerJoints-v3 at radius 0.02 with shadows is panda-gym's PandaReachJoints-v3 pixel for pixel
    (same goals, rewards, successes); at 0.05 the marker is several times larger and shows in every frame where
    the segmentation mask says it is in view, with or without shadows."""
    ours = make_env(EnvConfig(**{**PANDA_ENV, "id": "PandaReachMarkerJoints-v3"}))
    action = np.linspace(-0.5, 0.5, 7, dtype=np.float32)
    for seed in (0, 1):
        theirs_frame, theirs_info = panda_env.reset(seed=seed)
        frame, info = ours.reset(seed=seed)
        assert np.array_equal(frame, theirs_frame) and np.array_equal(info["desired_goal"], theirs_info["desired_goal"])
        for _ in range(3):
            theirs_step, our_step = panda_env.step(action), ours.step(action)
            assert np.array_equal(our_step[0], theirs_step[0]) and our_step[1:3] == theirs_step[1:3]
            assert our_step[4]["is_success"] == theirs_step[4]["is_success"]
    assert ours.unwrapped.task.distance_threshold == 0.05 and ours.spec.max_episode_steps == 50
    ours.close()
    counts = {}
    for radius, shadows in ((0.02, True), (0.05, True), (0.05, False)):
        env = make_env(EnvConfig(**{**PANDA_ENV, "id": "PandaReachMarkerJoints-v3", "goal_radius": radius,
                                    "render_shadows": shadows}))
        counts[radius, shadows] = []
        for i in range(6):
            frame, _ = env.reset(seed=3_000_000_000 + i)  # evaluation goals
            pixels = int(goal_marker_mask(frame).sum())
            counts[radius, shadows].append(pixels)
            if radius == 0.05:
                assert (pixels > 0) == marker_in_view(env), f"goal {i}: marker pixels {pixels}"
        env.close()
    assert np.median(counts[0.05, True]) > 3 * np.median(counts[0.02, True])
    assert min(counts[0.05, False]) >= 20  # about 38 px at 64x64 for these goals, shadows or not


def test_camera_axes_are_the_cameras_right_up_and_backward_directions():
    """camera_axes: orthonormal rows; the backward row points from the target to the camera (up, for a camera
    pitched down); a camera 90 degrees round in yaw turns it 90 degrees about z, leaving its height."""
    axes = camera_axes(EnvConfig(**PANDA_ENV))  # yaw 45, pitch -40
    np.testing.assert_allclose(axes @ axes.T, np.eye(3), atol=1e-6)
    backward = axes[2]
    np.testing.assert_allclose(backward[2], np.sin(np.radians(40)), atol=1e-6)  # the camera looks down 40 degrees
    turned = camera_axes(EnvConfig(**PANDA_ENV, camera_yaw=-45.0))[2]
    np.testing.assert_allclose(turned[2], backward[2], atol=1e-6)
    assert abs(turned[:2] @ backward[:2]) < 1e-6  # horizontal parts at right angles
    np.testing.assert_allclose(camera_axes(EnvConfig(**PANDA_ENV, camera_pitch=-89.9))[2], [0, 0, 1], atol=2e-3)


def test_two_views_tile_the_middle_of_each_camera_and_show_the_marker_where_it_is_in_view():
    """env.views: 2 renders one render_size frame whose left half is the middle of the first camera's one-view
    image and whose right half that of the view2_* camera's (all but an edge pixel or so); each half shows the marker exactly
    where pybullet's segmentation mask puts it in that camera's view."""
    marker = {**PANDA_ENV, "id": "PandaReachMarkerJoints-v3", "goal_radius": 0.05, "render_shadows": False}
    two = make_env(EnvConfig(**marker, views=2, view2_yaw=-45.0, view2_distance=0.8, view2_pitch=-30.0))
    first = make_env(EnvConfig(**marker))
    second = make_env(EnvConfig(**marker, camera_yaw=-45.0, camera_distance=0.8, camera_pitch=-30.0))
    action = np.linspace(-0.5, 0.5, 7, dtype=np.float32)
    seen = []
    for i in range(4):
        seed = 3_000_000_000 + i  # evaluation goals
        frames = [env.reset(seed=seed)[0] for env in (two, first, second)]
        for _ in range(i):  # the arm moves: what it hides changes
            frames = [env.step(action)[0] for env in (two, first, second)]
        assert frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
        tiled, one, other = (env.unwrapped.render() for env in (two, first, second))
        assert tiled.shape == (84, 84, 3)
        for half, full in ((tiled[:, :42], one), (tiled[:, 42:], other)):  # the rasteriser may round an edge pixel
            assert (half == full[:, 21:63]).all(-1).mean() > 0.995  # otherwise (1 pixel is 0.03 %)
        target = two.unwrapped.sim._bodies_idx["target"]
        for half, (rgb, segmentation) in zip((tiled[:, :42], tiled[:, 42:]), two.unwrapped.camera_images()):
            assert np.array_equal(rgb, half)
            in_view = bool((segmentation == target).any())
            assert goal_marker_mask(half).any() == in_view, f"goal {i}: marker pixels against the mask"
            seen.append(in_view)
    assert sum(seen) >= 6  # most of the 8 views see the marker: the check compared pixels that exist
    for env in (two, first, second):
        env.close()


def test_the_marker_keys_need_the_projects_ids(tmp_path):
    config = write_config(tmp_path, tmp_path / "run", **{**TINY_PANDA, "env": PANDA_ENV})  # panda-gym's own id
    proc = run_script("01_generate_rollouts", config, "--set", "env.goal_radius=0.05")
    assert_user_error(proc, "env.goal_radius", "PandaReachMarkerJoints-v3")
    proc = run_script("01_generate_rollouts", config, "--set", "env.render_shadows=false")
    assert_user_error(proc, "env.render_shadows")
    proc = run_script("01_generate_rollouts", config, "--set", "env.views=2")
    assert_user_error(proc, "env.views", "PandaReachMarkerJoints-v3")
    marker = write_config(tmp_path, tmp_path / "run", **TINY_PANDA)  # views: 2
    proc = run_script("01_generate_rollouts", marker, "--set", "env.render_size=83")
    assert_user_error(proc, "env.render_size", "even")
    assert not os.path.exists(tmp_path / "run")


def test_the_marker_benchmark_measures_each_setting(tmp_path):
    config = write_config(tmp_path, tmp_path / "run", **TINY_PANDA)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "panda_marker.py"), "--config", config,
                           "--goals", "2", "--radii", "0.05"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 0.05 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["on", "off"]
    assert all(float(r.split("|")[6]) > 0 and r.split("|")[4].strip() == "100%" for r in rows)
    assert all(r.split("|")[5].strip() == "100% / 100%; 100%" for r in rows)  # TINY_PANDA: two views
    assert "PandaReachMarkerJoints-v3" in proc.stdout and not os.path.exists(tmp_path / "run")
    car = write_config(tmp_path, tmp_path / "car")
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "panda_marker.py"), "--config", car],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_user_error(bad, "env.id", "PandaReach")
