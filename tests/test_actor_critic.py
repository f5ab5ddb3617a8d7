"""The actor-critic trained in imagination: lambda-returns, where its gradients go, and a learning test."""

import numpy as np
import pytest
import torch

from models.actor_critic import (
    ActorCritic,
    ActorCriticConfig,
    filtered_states,
    imagination_update,
    lambda_returns,
)
from models.ensemble import MemoryEnsemble
from models.mdnrnn import MDNRNN, MDNRNNConfig
from models.rssm import RSSM, RSSMConfig, RSSMOptions


def test_round_trip_and_the_wrong_kind(tmp_path):
    from utils.checkpoints import load_model, save_model
    from utils.errors import UserError

    torch.manual_seed(0)
    ac = ActorCritic(ActorCriticConfig(units=8, max_std=0.5), 5, [-1.0, 0.0], [1.0, 1.0])
    ac.return_scale.fill_(3.0)
    path = str(tmp_path / "ac.pt")
    save_model(path, ac)
    again, ckpt = load_model(path, "controller")
    assert isinstance(again, ActorCritic) and ckpt["kind"] == "actor_critic" and again.config == ac.config
    x = torch.randn(4, 5)
    torch.testing.assert_close(again(x), ac(x))
    torch.testing.assert_close(again.value(x, slow=True), ac.value(x, slow=True))
    assert np.array_equal(again.get_params(), ac.get_params()) and float(again.return_scale) == 3.0
    assert again.policy(x).stddev.max() <= 0.5  # the sigma bound travels with the config
    with pytest.raises(UserError, match=r"ac.pt: checkpoint of kind 'actor_critic', expected a memory checkpoint"):
        load_model(path, "memory")
    with pytest.raises(ValueError, match="min_std"):
        ActorCritic(ActorCriticConfig(min_std=1.0, max_std=1.0), 5, [-1.0], [1.0])


def test_the_averaged_actor_is_an_ema_of_the_actors_weights(tmp_path):
    from utils.checkpoints import load_model, save_model

    torch.manual_seed(0)
    plain = ActorCritic(ActorCriticConfig(units=8), 5, [-1.0], [1.0])
    assert not any(k.startswith("averaged_actor.") for k in plain.state_dict())  # older checkpoints still load
    assert np.array_equal(plain.deployed_params(), plain.get_params())
    ac = ActorCritic(ActorCriticConfig(units=8, actor_average=0.25), 5, [-1.0], [1.0])
    before = ac.get_params()
    assert np.array_equal(ac.deployed_params(), before)  # the average starts at the actor
    after = before + np.linspace(-1, 1, before.size, dtype=np.float32)
    ac.set_params(after)
    ac.update_averaged_actor()
    np.testing.assert_allclose(ac.deployed_params(), 0.75 * before + 0.25 * after, atol=1e-6)
    path = str(tmp_path / "ac.pt")
    save_model(path, ac)
    again, _ = load_model(path, "controller")
    assert np.array_equal(again.deployed_params(), ac.deployed_params())
    again.reset_averaged_actor()
    assert np.array_equal(again.deployed_params(), after)


def test_lambda_one_with_a_zero_critic_is_the_discounted_return():
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    returns = lambda_returns(rewards, torch.zeros(4, 1), torch.ones(3, 1), gamma=0.5, lam=1.0)
    expected = torch.tensor([[1 + 0.5 * 2 + 0.25 * 3], [2 + 0.5 * 3], [3.0]])
    torch.testing.assert_close(returns, expected)


def test_lambda_zero_is_the_one_step_td_target():
    rewards = torch.tensor([[1.0, 0.0], [2.0, -1.0]])
    values = torch.tensor([[9.0, 9.0], [10.0, 4.0], [20.0, 8.0]])
    continues = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    returns = lambda_returns(rewards, values, continues, gamma=0.9, lam=0.0)
    expected = rewards + 0.9 * continues * values[1:]  # r_t + gamma c_t v(s_{t+1})
    torch.testing.assert_close(returns, expected)


def test_lambda_returns_by_hand_and_shape_errors():
    # H = 2, gamma 0.5, lambda 0.5, c = 1: R_1 = r_1 + 0.5 v_2; R_0 = r_0 + 0.5 (0.5 v_1 + 0.5 R_1)
    rewards, values = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0], [8.0]])
    r1 = 2 + 0.5 * 8
    r0 = 1 + 0.5 * (0.5 * 4 + 0.5 * r1)
    torch.testing.assert_close(lambda_returns(rewards, values, torch.ones(2, 1), 0.5, 0.5), torch.tensor([[r0], [r1]]))
    with pytest.raises(ValueError, match="need values of 3 steps"):
        lambda_returns(rewards, values[:2], torch.ones(2, 1), 0.5, 0.5)


def small_memories():
    torch.manual_seed(0)
    yield MDNRNN(MDNRNNConfig(hidden=16, gaussians=3), z_dim=4, action_dim=2)
    yield RSSM(RSSMConfig(hidden=16, rssm=RSSMOptions(stoch=4, units=16)), z_dim=4, action_dim=2)
    yield RSSM(RSSMConfig(hidden=16, rssm=RSSMOptions(stoch=3, classes=4, units=16)), z_dim=4, action_dim=2)
    # an ensemble M: each row imagines in member b % 3's world while member 0 gives the actor its features
    yield MemoryEnsemble([MDNRNN(MDNRNNConfig(hidden=16, gaussians=3), z_dim=4, action_dim=2) for _ in range(3)])


@pytest.mark.parametrize("gradient", ["dynamics", "reinforce"])
@pytest.mark.parametrize("memory", list(small_memories()), ids=["mdnrnn", "rssm", "rssm_discrete", "ensemble"])
def test_actor_gradients_reach_the_actor_and_leave_m_untouched(memory, gradient):
    memory.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in memory.state_dict().items()}
    ac = ActorCritic(ActorCriticConfig(units=16, horizon=5, entropy=0.0, actor_gradient=gradient),
                     memory.feature_dim, [-1, -1], [1, 1])
    actor_before = [p.clone() for p in ac.actor.parameters()]
    opts = [torch.optim.Adam(net.parameters(), lr=1e-2) for net in (ac.actor, ac.critic)]
    g = torch.Generator().manual_seed(0)
    start = filtered_states(memory, torch.randn(3, 6, 4, generator=g), torch.rand(3, 5, 2, generator=g) * 2 - 1)
    assert len(start[0]) == 3 * 6
    out = imagination_update(memory, ac, *opts, start)
    assert out["skipped"] == 0.0 and np.isfinite(out["actor_loss"])
    # with no entropy bonus the actor's only gradient is the one through M's dynamics into the actions
    # (dynamics), or the likelihood ratio of the sampled actions (reinforce)
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, ac.actor.parameters()))
    assert all(p.grad is None for p in memory.parameters())
    assert all(torch.equal(before[k], v) for k, v in memory.state_dict().items())


def test_the_reinforce_actor_loss_is_the_likelihood_ratio_of_the_advantage():
    from models.actor_critic import actor_critic_losses, imagine

    torch.manual_seed(0)
    memory = MDNRNN(MDNRNNConfig(hidden=16, gaussians=3), z_dim=4, action_dim=2).eval().requires_grad_(False)
    c = ActorCriticConfig(units=16, horizon=4, gamma=0.9, lam=0.8, entropy=0.01, actor_gradient="reinforce")
    ac = ActorCritic(c, memory.feature_dim, [-1, 0], [1, 1])
    ac.return_scale.fill_(2.5)
    g = torch.Generator().manual_seed(1)
    start = filtered_states(memory, torch.randn(3, 4, 4, generator=g), torch.rand(3, 3, 2, generator=g))
    taus = []
    sample = memory.imagine
    memory.imagine = lambda state, tau, generator: taus.append(tau) or sample(state, tau, generator)
    traj = imagine(memory, ac, start, c.horizon, torch.Generator().manual_seed(2), temperature=0.7)
    assert taus == [0.7] * c.horizon  # M samples at the tau of controller.temperature, not a fixed 1.0
    # the rollout itself carries no gradient: the actor never sees M's slope, only the values of its samples
    assert not any(traj[k].requires_grad for k in ("features", "rewards", "continues", "raw_actions"))
    pi = ac.policy(traj["features"][:-1])
    torch.testing.assert_close(traj["log_probs"], pi.log_prob(traj["raw_actions"]).sum(-1))

    returns = lambda_returns(traj["rewards"], ac.value(traj["features"], slow=True), traj["continues"], 0.9, 0.8)
    spread = torch.quantile(returns, 0.95) - torch.quantile(returns, 0.05)
    scale = 0.99 * 2.5 + 0.01 * max(float(spread), 1.0)
    weights = torch.cumprod(torch.cat([torch.ones(1, 12), 0.9 * traj["continues"][:-1]]), 0)
    advantage = (returns - ac.value(traj["features"][:-1])).detach() / scale
    by_hand = -(weights * (advantage * pi.log_prob(traj["raw_actions"]).sum(-1) + 0.01 * pi.entropy().sum(-1))).mean()
    losses = actor_critic_losses(ac, traj)
    torch.testing.assert_close(losses["actor_loss"], by_hand)
    grads = torch.autograd.grad(losses["actor_loss"], list(ac.actor.parameters()))
    expected = torch.autograd.grad(by_hand, list(ac.actor.parameters()))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- learning test: 2-D point to a goal


class PointGoal:
    """p in [-1, 1]^2 moves by 0.2 a (a in [-1, 1]^2); reward -|p' - g| per step; 20 steps; z = [p, g]."""

    steps = 20

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.p, self.g = rng.uniform(-1, 1, 2), rng.uniform(-1, 1, 2)

    def z(self) -> np.ndarray:
        return np.concatenate([self.p, self.g]).astype(np.float32)

    def step(self, a) -> float:
        self.p = np.clip(self.p + 0.2 * np.clip(a, -1, 1), -1, 1)
        return -float(np.linalg.norm(self.p - self.g))


def play(policy, seeds, start=lambda: None) -> float:
    """Mean return of `policy(z, state) -> (action, state)` over the episodes of `seeds`, state = start() at each
    episode's beginning."""
    returns = []
    for seed in seeds:
        env = PointGoal(seed)
        policy_state = start()
        total = 0.0
        for _ in range(env.steps):
            a, policy_state = policy(env.z(), policy_state)
            total += env.step(a)
        returns.append(total)
    return float(np.mean(returns))


def random_episodes(n: int, seed: int):
    rng = np.random.default_rng(seed)
    z, a, r = [], [], []
    for i in range(n):
        env = PointGoal(10_000 + i)
        zs, acts, rews = [env.z()], [], []
        for _ in range(env.steps):
            act = rng.uniform(-1, 1, 2).astype(np.float32)
            rews.append(env.step(act))
            acts.append(act)
            zs.append(env.z())
        z.append(zs), a.append(acts), r.append(rews)
    return (torch.tensor(np.array(z)), torch.tensor(np.array(a)), torch.tensor(np.array(r), dtype=torch.float32))


@pytest.mark.parametrize("gradient", ["dynamics", "reinforce"])
def test_actor_critic_trained_only_in_an_rssm_closes_most_of_the_gap(gradient):
    torch.manual_seed(0)
    z, a, r = random_episodes(256, seed=1)
    memory = RSSM(RSSMConfig(hidden=64, rssm=RSSMOptions(stoch=8, units=64, free_nats=0.1)), z_dim=4, action_dim=2)
    opt = torch.optim.Adam(memory.parameters(), lr=3e-3)
    ones = torch.ones(32, PointGoal.steps)
    for step in range(400):  # M from random play only
        idx = torch.randint(len(z), (32,))
        terms = memory.loss(z[idx], a[idx], r[idx], torch.zeros_like(ones), ones, ones)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    memory.eval().requires_grad_(False)

    ac = ActorCritic(ActorCriticConfig(units=64, horizon=10, gamma=0.95, entropy=1e-3, actor_lr=3e-4,
                                       critic_lr=1e-3, actor_gradient=gradient), memory.feature_dim, [-1, -1], [1, 1])
    opts = (torch.optim.Adam(ac.actor.parameters(), lr=3e-4), torch.optim.Adam(ac.critic.parameters(), lr=1e-3))
    for step in range(300):  # C only in imagination
        idx = torch.randint(len(z), (16,))
        imagination_update(memory, ac, *opts, filtered_states(memory, z[idx], a[idx]))

    def agent(obs, state):
        with torch.no_grad():
            state = memory.observe(state, torch.from_numpy(obs)[None])
            action = ac.act(memory.features(state))
            return action[0].numpy(), memory.transition(state, action)

    rng = np.random.default_rng(2)
    held_out = range(50_000, 50_050)
    random_return = play(lambda obs, s: (rng.uniform(-1, 1, 2), s), held_out)
    reference = play(lambda obs, s: (np.clip((obs[2:] - obs[:2]) / 0.2, -1, 1), s), held_out)
    learned = play(agent, held_out, lambda: memory.initial_state(1))
    closed = (learned - random_return) / (reference - random_return)
    print(f"{gradient}: 50 held-out episodes: random {random_return:.2f}, reference {reference:.2f}, "
          f"actor-critic {learned:.2f} ({closed:.0%} of the gap closed)")
    assert closed > 0.5, f"random {random_return:.2f}, reference {reference:.2f}, learned {learned:.2f}"


# ---------------------------------------------------------------- stage 05 and 06 with controller.kind actor_critic


def test_stage_05_trains_the_actor_critic_in_imagination_resumes_and_06_plays_it(tiny_run, tmp_path):
    import csv
    import json
    import os
    import shutil

    from conftest import assert_ok, assert_user_error, run_script, write_config
    from utils.checkpoints import load_model

    run_dir = tmp_path / "run"
    for stage in ("rollouts", "vision", "latents", "mdnrnn"):
        shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / stage)
    controller = {"kind": "actor_critic", "updates": 4, "eval_every": 2, "eval_episodes": 1, "batch_windows": 2,
                  "workers": 1, "actor_critic": {"units": 16, "horizon": 3}}
    config = write_config(tmp_path, run_dir, controller=controller, evaluate={"episodes": 2, "max_steps": 30,
                                                                              "workers": 1, "fid_frames": 0})
    first = run_script("05_train_controller", config)
    assert_ok(first)
    assert "actor-critic in the imagination of M (mdnrnn" in first.stdout
    rows = list(csv.DictReader(open(run_dir / "controller" / "history.csv")))
    assert [r["update"] for r in rows] == ["2", "4"] and all(r["heldout_mean"] for r in rows)
    # the same command with more updates resumes from latest.pt: the first rows stay, one more is added
    controller["updates"] = 6
    config = write_config(tmp_path, run_dir, controller=controller, evaluate={"episodes": 2, "max_steps": 30,
                                                                              "workers": 1, "fid_frames": 0})
    second = run_script("05_train_controller", config)
    assert_ok(second)
    assert "resuming at update 5/6" in second.stdout
    again = list(csv.DictReader(open(run_dir / "controller" / "history.csv")))
    assert again[:2] == rows and [r["update"] for r in again] == ["2", "4", "6"]
    # tau is part of what a resume state must match: another tau is refused before anything is written
    config_tau = write_config(tmp_path, run_dir, controller={**controller, "updates": 8, "temperature": 0.5},
                              evaluate={"episodes": 2, "max_steps": 30, "workers": 1, "fid_frames": 0})
    assert_user_error(run_script("05_train_controller", config_tau), "latest.pt", "at tau 1.0", "at tau 0.5")
    assert list(csv.DictReader(open(run_dir / "controller" / "history.csv"))) == again
    config = write_config(tmp_path, run_dir, controller=controller, evaluate={"episodes": 2, "max_steps": 30,
                                                                              "workers": 1, "fid_frames": 0})
    # a resumed run is the run that never stopped: every update is seeded by its index, latest.pt holds the rest
    straight = tmp_path / "straight"
    for stage in ("rollouts", "vision", "latents", "mdnrnn"):
        shutil.copytree(run_dir / stage, straight / stage)
    (tmp_path / "straight_cfg").mkdir()
    assert_ok(run_script("05_train_controller", write_config(tmp_path / "straight_cfg", straight, controller=controller)))
    whole = list(csv.DictReader(open(straight / "controller" / "history.csv")))
    timing = ("seconds", "worker_restarts")
    assert [{k: v for k, v in r.items() if k not in timing} for r in whole] == \
        [{k: v for k, v in r.items() if k not in timing} for r in again]
    c, ckpt = load_model(str(run_dir / "controller" / "controller.pt"), "controller")
    assert c.kind == "actor_critic" and ckpt["update"] == 6 and ckpt["best"]["update"] in (2, 4, 6)
    assert_ok(run_script("06_evaluate", config))
    scores = json.load(open(run_dir / "eval" / "scores.json"))
    assert scores["episodes"] == 2 and scores["params_unit"] == "update" and "dream" in scores
    assert (run_dir / "eval" / "dream.gif").exists()


def test_stage_05_continues_an_actor_critic_from_init_from(tiny_run, tmp_path):
    """controller.init_from with the actor-critic: the actor (params_mean, evaluate.params mean), critic, slow
    critic and return scale start from that checkpoint (tiny learning rates keep the actor there); a fresh run
    starts elsewhere, and with actor_average its averaged actor is what it saves to play. A linear C or another
    width is refused before anything is written."""
    import os
    import shutil

    from conftest import assert_ok, assert_user_error, run_script, write_config
    from utils.checkpoints import load_model, save_model

    memory, _ = load_model(os.path.join(tiny_run["run_dir"], "mdnrnn", "best.pt"), "memory")
    torch.manual_seed(7)
    previous = ActorCritic(ActorCriticConfig(units=16), memory.feature_dim, [-1.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    previous.return_scale.fill_(5.0)
    final = previous.get_params() + 0.5  # the last actor, which evaluate.params mean names
    first = str(tmp_path / "previous.pt")
    save_model(first, previous, params_mean=torch.from_numpy(final))
    controller = {"kind": "actor_critic", "updates": 2, "eval_every": 2, "eval_episodes": 1, "batch_windows": 2,
                  "workers": 1, "actor_critic": {"units": 16, "horizon": 3, "actor_lr": 1e-9, "critic_lr": 1e-9}}

    def run(name: str, **overrides):
        run_dir = tmp_path / name
        for stage in ("vision", "latents", "mdnrnn"):
            shutil.copytree(os.path.join(tiny_run["run_dir"], stage), run_dir / stage)
        os.makedirs(tmp_path / f"{name}_cfg")
        config = write_config(tmp_path / f"{name}_cfg", run_dir, controller={**controller, **overrides},
                              evaluate={"params": "mean", "max_steps": 30})
        return run_script("05_train_controller", config), run_dir

    averaged = {**controller["actor_critic"], "actor_average": 0.5}
    proc, run_dir = run("continued", init_from=first, actor_critic=averaged)  # from a C without an average
    assert_ok(proc)
    assert f"from the actor-critic of {first}" in proc.stdout
    after, ckpt = load_model(str(run_dir / "controller" / "controller.pt"), "controller")
    assert np.abs(ckpt["params_mean"].numpy() - final).max() < 1e-6
    assert float(after.return_scale) > 4.0  # 5.0, moved by the EMA towards this M's spread
    x = torch.randn(3, memory.feature_dim)
    torch.testing.assert_close(after.value(x, slow=True), previous.value(x, slow=True), atol=1e-5, rtol=0)
    proc, run_dir = run("fresh", actor_critic={**averaged, "actor_lr": 1e-2})
    assert_ok(proc)
    _, ckpt = load_model(str(run_dir / "controller" / "controller.pt"), "controller")
    assert np.abs(ckpt["params_mean"].numpy() - final).max() > 0.1
    state, _ = load_model(str(run_dir / "controller" / "latest.pt"), "controller")  # the averaged actor plays
    assert np.array_equal(ckpt["params_mean"].numpy(), state.deployed_params())
    assert np.abs(state.deployed_params() - state.get_params()).max() > 1e-4
    for name, path, expected in (("linear", os.path.join(tiny_run["run_dir"], "controller", "controller.pt"),
                                  "holds a linear C"), ("wider", first, "units 16")):
        units = 32 if name == "wider" else 16
        proc, run_dir = run(name, init_from=path, actor_critic={**controller["actor_critic"], "units": units})
        assert_user_error(proc, "controller.init_from", expected)
        assert not (run_dir / "controller").exists()
