"""An actor-critic C trained only in imagination, inside a frozen M (Dreamer: Hafner et al. 2020, 2021, 2023).

Imagination starts from M's filtered states of real latent sequences and rolls
H steps with the actor's actions through M.transition and M.imagine; M's heads
give rewards r_t and continuation c_t = 1 - sigmoid(done logit). The critic v
regresses lambda-returns (DreamerV1 eq. 6), bootstrapped from a slow critic:

    R_t = r_t + gamma c_t ((1 - lambda) v(s_{t+1}) + lambda R_{t+1}),   R_H = v(s_H).

The actor maximises R / max(1, S) + eta H[pi] with S the EMA of the 5th to
95th percentile range of the returns (DreamerV3's return normalisation), by one
of two gradient estimators (actor_gradient), M's own parameters frozen in both:

- dynamics (DreamerV1, and V2 for continuous actions): the gradient of R flows
  back through M's reward head and dynamics into reparameterised actions. It
  follows M's gradient, so it also climbs M's errors wherever M's reward rises
  with an action more steeply than the env's does.
- reinforce (DreamerV3 for every action space, its `imag_loss`): the
  likelihood-ratio gradient sg((R_t - v(s_t)) / max(1, S)) grad log pi(u_t | s_t),
  with the critic as baseline; the imagined trajectory carries no gradient, so
  the actor sees only the values M gives the actions it sampled.

Actions: a = squash_to_bounds(u), u ~ N(mu, sigma) (the tanh squashing of the
linear C); the entropy bonus uses the entropy of the Gaussian over u.

With actor_average > 0 an averaged actor, an exponential moving average of the
actor's weights after every update (Polyak & Juditsky 1992; the averaged
policy of Nikishin et al. 2018), is the one that acts in the real env: the
actor's score swings within 100 updates in one fixed M, and its average moves
only as far as the actor does on the whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from models.controller import squash_to_bounds
from models.hparams import param


def lambda_returns(rewards: torch.Tensor, values: torch.Tensor, continues: torch.Tensor, gamma: float,
                   lam: float) -> torch.Tensor:
    """TD(lambda) returns of imagined trajectories (DreamerV1 eq. 6).

    rewards, continues float (H, B): r_t for the action at t and c_t in [0, 1], whether the episode goes on
    after it; values float (H + 1, B): v(s_0) ... v(s_H). Returns float (H, B): R_0 ... R_{H-1} with
    R_t = r_t + gamma c_t ((1 - lam) v(s_{t+1}) + lam R_{t+1}) and R_H = v(s_H).
    lam = 1 with v = 0 gives the discounted sum of rewards; lam = 0 gives the one-step TD target.
    """
    horizon = rewards.shape[0]
    if values.shape[0] != horizon + 1 or continues.shape != rewards.shape:
        raise ValueError(f"lambda_returns: rewards {tuple(rewards.shape)} and continues {tuple(continues.shape)} "
                         f"need values of {horizon + 1} steps, got {tuple(values.shape)}")
    out, last = [], values[-1]
    for t in reversed(range(horizon)):
        last = rewards[t] + gamma * continues[t] * ((1 - lam) * values[t + 1] + lam * last)
        out.append(last)
    return torch.stack(out[::-1])


@dataclass
class ActorCriticConfig:
    """C's hyperparameters when it is an actor-critic (controller.kind: actor_critic)."""

    units: int = param(256, "width of the actor's and the critic's two hidden layers", minimum=1)
    horizon: int = param(15, "imagination horizon H (steps)", minimum=1)
    gamma: float = param(0.99, "discount", minimum=0, maximum=1)
    lam: float = param(0.95, "lambda of the lambda-returns", minimum=0, maximum=1)
    entropy: float = param(3e-4, "eta: weight of the actor's entropy bonus", minimum=0)
    actor_lr: float = param(8e-5, "Adam learning rate of the actor", above=0)
    critic_lr: float = param(8e-5, "Adam learning rate of the critic", above=0)
    slow_critic: float = param(0.02, "EMA rate of the slow critic that bootstraps the returns", above=0, maximum=1)
    actor_average: float = param(0.0, "EMA rate of the averaged actor that plays the real env and 06's dream "
                                 "(0: the actor itself)", minimum=0, maximum=1)
    min_std: float = param(0.1, "lower bound of the actor's sigma (pre-squash units)", above=0)
    max_std: float = param(1.0, "upper bound of the actor's sigma (pre-squash units; DreamerV3's 1)", above=0)
    grad_clip: float = param(100.0, "max global gradient norm of each of actor and critic", above=0)
    actor_gradient: str = param("dynamics", "the actor's gradient estimator: dynamics (backprop through M into the "
                                "actions, DreamerV1/V2) or reinforce (likelihood ratio with the critic as baseline, "
                                "DreamerV3)", choices=("dynamics", "reinforce"))


def _flat(net: nn.Module) -> np.ndarray:
    return torch.nn.utils.parameters_to_vector(net.parameters()).detach().cpu().numpy().copy()


def _ema(target: nn.Module, source: nn.Module, rate: float) -> None:
    """target <- (1 - rate) target + rate source, parameter by parameter."""
    with torch.no_grad():
        for slow, fast in zip(target.parameters(), source.parameters(), strict=True):
            slow.lerp_(fast, rate)


def _mlp(n_in: int, units: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, units), nn.ELU(), nn.Linear(units, units), nn.ELU(),
                         nn.Linear(units, n_out))


class ActorCritic(nn.Module):
    """Actor pi(a | x) and critic v(x) on M's features x (B, in_dim), actions in [low, high] (A,).

    Args:
        config: ActorCriticConfig; in_dim: M.feature_dim; action_low, action_high: the env's bounds.

    Raises:
        ValueError: min_std >= max_std.
    """

    kind = "actor_critic"
    config_class = ActorCriticConfig

    def __init__(self, config: ActorCriticConfig | None = None, in_dim: int = 1, action_low=(-1.0,),
                 action_high=(1.0,)):
        super().__init__()
        config = config or ActorCriticConfig()
        if not config.min_std < config.max_std:
            raise ValueError(f"actor_critic.min_std ({config.min_std}) must be below max_std ({config.max_std})")
        self.config, self.in_dim = config, int(in_dim)
        self.low = np.asarray(action_low, dtype=np.float32)
        self.high = np.asarray(action_high, dtype=np.float32)
        self.action_dim = len(self.low)
        self.actor = _mlp(self.in_dim, config.units, 2 * self.action_dim)
        self.critic = _mlp(self.in_dim, config.units, 1)
        self.slow_critic = _mlp(self.in_dim, config.units, 1)
        self.slow_critic.load_state_dict(self.critic.state_dict())
        self.slow_critic.requires_grad_(False)
        if config.actor_average > 0:  # only then in the state dict: checkpoints without it load as before
            self.averaged_actor = _mlp(self.in_dim, config.units, 2 * self.action_dim)
            self.averaged_actor.requires_grad_(False)
            self.reset_averaged_actor()
        self.register_buffer("return_scale", torch.ones(()))  # EMA of the 5-95 percentile range, >= 1

    @classmethod
    def for_world_model(cls, config: ActorCriticConfig, feature_dim: int, action_low, action_high,
                        info_dims: dict[str, int] | None = None) -> "ActorCritic":
        """The actor-critic on M's features (feature_dim = M.feature_dim); it reads no env info entries."""
        return cls(config, feature_dim, action_low, action_high)

    def sizes(self) -> dict:
        """The sizes M and the env fixed (stored beside the config in a checkpoint)."""
        return {"in_dim": self.in_dim, "action_low": self.low.tolist(), "action_high": self.high.tolist()}

    # what the agent and the episode workers read from any C (models/agent.py, utils/episodes.py)
    inputs = "z_h"
    info_keys: tuple[str, ...] = ()
    reads_positions = False
    features_only = True

    def extra_inputs(self, info: dict, positions=None) -> None:
        """None: the actor reads M's features only."""
        return None

    def forward(self, features: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The deterministic action squash(mean) float32 (B, A) on M's features (B, in_dim): how C acts in the
        real env and in 06's dream."""
        return self.act(features)

    @property
    def num_params(self) -> int:
        """Size of the actor's flat parameter vector (what the episode workers receive)."""
        return sum(p.numel() for p in self.actor.parameters())

    def get_params(self) -> np.ndarray:
        """The actor's parameters as one flat float32 vector (num_params,)."""
        return _flat(self.actor)

    def deployed_params(self) -> np.ndarray:
        """The parameters, flat float32 (num_params,), of the actor that plays the real env: the averaged actor's
        with actor_average > 0, else the actor's own (`get_params`)."""
        return _flat(self.averaged_actor if self.config.actor_average > 0 else self.actor)

    def set_params(self, flat) -> None:
        """Load the actor's parameters from a flat vector of `get_params`.

        Raises:
            ValueError: a vector of another size.
        """
        flat = torch.as_tensor(np.asarray(flat, dtype=np.float32).ravel())
        if flat.numel() != self.num_params:
            raise ValueError(f"actor-critic expects {self.num_params} actor parameters, got {flat.numel()}")
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, self.actor.parameters())

    def policy(self, x: torch.Tensor) -> torch.distributions.Normal:
        """The Gaussian over pre-squash actions u, (B, A) each; sigma in [min_std, max_std] (DreamerV3's
        sigmoid bound: without an upper bound the entropy bonus and the tanh squash let sigma grow without end)."""
        mean, raw_std = self.actor(x).chunk(2, dim=-1)
        c = self.config
        std = c.min_std + (c.max_std - c.min_std) * torch.sigmoid(raw_std + 2.0)
        return torch.distributions.Normal(mean, std, validate_args=False)

    def act(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Action float32 (B, A) within the bounds: squash(mean), or squash(u) for a reparameterised u ~ pi."""
        pi = self.policy(x)
        return squash_to_bounds(pi.rsample() if sample else pi.mean, self.low, self.high)

    def value(self, x: torch.Tensor, slow: bool = False) -> torch.Tensor:
        """v(x) float32 (B,) from the critic, or from the slow critic."""
        return (self.slow_critic if slow else self.critic)(x).squeeze(-1)

    def update_slow_critic(self) -> None:
        """slow <- (1 - rate) slow + rate critic."""
        _ema(self.slow_critic, self.critic, self.config.slow_critic)

    def update_averaged_actor(self) -> None:
        """averaged <- (1 - rate) averaged + rate actor, with rate = actor_average (nothing when it is 0)."""
        if self.config.actor_average > 0:
            _ema(self.averaged_actor, self.actor, self.config.actor_average)

    def reset_averaged_actor(self) -> None:
        """Start the average at the actor's current weights (a fresh actor, or one continued from a checkpoint)."""
        if self.config.actor_average > 0:
            self.averaged_actor.load_state_dict(self.actor.state_dict())


def imagine(memory, ac: ActorCritic, start_state, horizon: int, generator=None, temperature: float = 1.0
            ) -> dict[str, torch.Tensor]:
    """Roll the actor H steps inside M from `start_state` (a batch of M states), M sampling at temperature tau
    (`memory.imagine`). With actor_gradient dynamics the graph runs from the actions through M's dynamics; with
    reinforce the rollout carries no gradient.

    Returns features (H + 1, B, F), rewards, continues and entropies (H, B); for reinforce also the sampled
    pre-squash actions `raw_actions` (H, B, A) and `log_probs` (H, B): log pi(u_t | s_t), with gradient to the
    actor only (the squash's Jacobian does not depend on the actor once u is drawn)."""
    reinforce = ac.config.actor_gradient == "reinforce"
    state, feats, rewards, continues, entropies, raw = start_state, [memory.features(start_state)], [], [], [], []
    with torch.set_grad_enabled(torch.is_grad_enabled() and not reinforce):
        for _ in range(horizon):
            pi = ac.policy(feats[-1])
            u = pi.rsample()
            action = squash_to_bounds(u, ac.low, ac.high)
            state = memory.imagine(memory.transition(state, action), temperature, generator)
            reward, done_logit = memory.heads(state)
            feats.append(memory.features(state))
            rewards.append(reward)
            continues.append(1 - torch.sigmoid(done_logit))
            if not reinforce:  # reinforce takes H[pi] below, where it has a gradient
                entropies.append(pi.entropy().sum(-1))
            raw.append(u)
    traj = {"features": torch.stack(feats), "rewards": torch.stack(rewards), "continues": torch.stack(continues)}
    if reinforce:  # the policy again on the (gradient-free) visited features: log pi and H[pi] reach the actor
        pi = ac.policy(traj["features"][:-1])
        traj["raw_actions"] = torch.stack(raw)
        traj["log_probs"] = pi.log_prob(traj["raw_actions"]).sum(-1)
        traj["entropies"] = pi.entropy().sum(-1)
    else:
        traj["entropies"] = torch.stack(entropies)
    return traj


def actor_critic_losses(ac: ActorCritic, traj: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The actor's and the critic's losses on an imagined trajectory (see the module docstring); updates the
    return scale (EMA, decay 0.99). Returns scalars: actor_loss, critic_loss, imagined_return (mean R_0),
    entropy (mean, nats)."""
    c = ac.config
    feats = traj["features"]
    values = ac.value(feats, slow=True)  # (H + 1, B): bootstrap targets from the slow critic
    returns = lambda_returns(traj["rewards"], values, traj["continues"], c.gamma, c.lam)  # (H, B)
    with torch.no_grad():  # weight of step t: the probability the imagined episode is still running there
        weights = torch.cumprod(torch.cat([torch.ones_like(traj["continues"][:1]), c.gamma * traj["continues"][:-1]]),
                                0)
        spread = torch.quantile(returns.detach().flatten(), 0.95) - torch.quantile(returns.detach().flatten(), 0.05)
        ac.return_scale.mul_(0.99).add_(0.01 * torch.clamp(spread, min=1.0))
    critic = ac.value(feats[:-1].detach())
    if c.actor_gradient == "reinforce":  # DreamerV3: advantage against the critic, normalised by the same scale
        advantage = ((returns - critic) / ac.return_scale).detach()
        objective = advantage * traj["log_probs"]
    else:
        objective = returns / ac.return_scale
    actor_loss = -(weights * (objective + c.entropy * traj["entropies"])).mean()
    critic_loss = (weights * 0.5 * (critic - returns.detach()).pow(2)).mean()
    return {"actor_loss": actor_loss, "critic_loss": critic_loss, "imagined_return": returns[0].mean().detach(),
            "entropy": traj["entropies"].mean().detach()}


@torch.no_grad()
def filtered_states(memory, z: torch.Tensor, a: torch.Tensor):
    """M's states after observing each real latent of windows z (B, T+1, D) with actions a (B, T, A): the
    start states of imagination, one M state batch of B * (T + 1) rows (time-major)."""
    state = memory.observe(memory.initial_state(len(z)), z[:, 0])
    states = [state]
    for t in range(a.shape[1]):
        state = memory.observe(memory.transition(state, a[:, t]), z[:, t + 1])
        states.append(state)
    return tuple(torch.cat(parts) for parts in zip(*states, strict=True))


def imagination_update(memory, ac: ActorCritic, actor_opt, critic_opt, start_state, generator=None,
                       temperature: float = 1.0) -> dict:
    """One update of actor and critic from imagined trajectories that start at `start_state`, M sampling at
    temperature tau (M frozen: its parameters must not require gradients). Returns the scalars of
    `actor_critic_losses` as floats, plus `skipped` (1.0 when a non-finite loss or gradient skipped the update)."""
    traj = imagine(memory, ac, start_state, ac.config.horizon, generator, temperature)
    losses = actor_critic_losses(ac, traj)
    actor_opt.zero_grad(set_to_none=True)
    critic_opt.zero_grad(set_to_none=True)
    total = losses["actor_loss"] + losses["critic_loss"]  # disjoint graphs: each loss reaches one network
    ok = bool(torch.isfinite(total))
    if ok:
        total.backward()
        norms = [torch.nn.utils.clip_grad_norm_(net.parameters(), ac.config.grad_clip) for net in (ac.actor, ac.critic)]
        ok = all(bool(torch.isfinite(n)) for n in norms)
    if ok:
        actor_opt.step()
        critic_opt.step()
        ac.update_slow_critic()
        ac.update_averaged_actor()
    return {**{k: float(v.detach()) for k, v in losses.items()}, "skipped": 0.0 if ok else 1.0}
