"""Recurrent state-space model M over V's latents (PlaNet, Hafner et al. 2019; DreamerV2, 2021; DreamerV3, 2023).

The state after observing z_t is (h_t, s_t): h_t deterministic (a GRU cell), s_t
stochastic, either Gaussian or `stoch` categoricals of `classes` classes
(one-hot samples, straight-through gradients, a 1 % uniform mix as in
DreamerV3). C reads the features [h_t, s_t].

    transition:  h_{t+1} = GRUCell(ELU(W [s_t, a_t]), h_t)
    prior:       p(s_{t+1} | h_{t+1})               (imagination)
    posterior:   q(s_{t+1} | h_{t+1}, z_{t+1})      (filtering with the real z)
    heads on [h_{t+1}, s_{t+1}]:  z_{t+1} ~ N(mu, sigma) (sigma bounded as M's mixture sigmas), the reward r_t
                 received for a_t, and the logit that the episode ends after a_t.

Training loss per step (DreamerV2 eq. 2 with the z head in place of the image
decoder): -log p(z_{t+1} | h, s) + reward MSE + done BCE + kl_weight x KL
balancing, alpha KL(sg(q) || p) + (1 - alpha) KL(q || sg(p)), each side
floored at free_nats (DreamerV3's free bits, per step, summed over s). The
reported `nll` is the negative ELBO of z_{t+1} per latent dimension, an upper
bound on -log p(z_{t+1} | z_<=t, a_<=t) and so comparable with the MDN-RNN's
exact `nll`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import distributions as D

from models.hparams import param
from models.mdnrnn import SequenceModelConfig, bounded_gaussian_nll

RSSMState = tuple[torch.Tensor, torch.Tensor]  # (h (B, hidden), s (B, stoch_dim))


@dataclass
class RSSMOptions:
    """The RSSM's own hyperparameters (memory.rssm in a config)."""

    stoch: int = param(32, "Gaussian: size of s; discrete: number of categoricals in s", minimum=1)
    classes: int = param(0, "0: Gaussian s; > 0: classes of each categorical (DreamerV2/V3 use 32 x 32)", minimum=0)
    units: int = param(256, "width of the MLP layers around the GRU (input, prior, posterior, heads)", minimum=1)
    min_std: float = param(0.1, "Gaussian s: lower bound of its standard deviation", above=0)
    unimix: float = param(0.01, "discrete s: share of the uniform distribution mixed into every categorical",
                          minimum=0, below=1)
    free_nats: float = param(1.0, "floor of each KL side per step (nats, summed over s)", minimum=0)
    kl_balance: float = param(0.8, "alpha: weight of KL(sg(q) || p), which trains the prior; 1 - alpha trains the "
                              "posterior (DreamerV2)", minimum=0, maximum=1)
    kl_weight: float = param(1.0, "weight of the balanced KL in the loss", minimum=0)


@dataclass
class RSSMConfig(SequenceModelConfig):
    """The RSSM's config: h's width and the z head's sigma bounds (shared with every M kind), plus `rssm`."""

    rssm: RSSMOptions = param(RSSMOptions(), "memory.kind rssm only")


def _mlp(n_in: int, units: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, units), nn.ELU(), nn.Linear(units, n_out))


class RSSM(nn.Module):
    """RSSM over latents z (B, z_dim) and actions (B, action_dim); see the module docstring.

    Args:
        config: RSSMConfig.
        z_dim, action_dim: sizes the data fixed.

    Raises:
        ValueError: min_log_sigma >= max_log_sigma.
    """

    kind = "rssm"
    config_class = RSSMConfig

    def __init__(self, config: RSSMConfig | None = None, z_dim: int = 32, action_dim: int = 3):
        super().__init__()
        config = config or RSSMConfig()
        if not config.min_log_sigma < config.max_log_sigma:
            raise ValueError(f"memory.min_log_sigma ({config.min_log_sigma}) must be below memory.max_log_sigma "
                             f"({config.max_log_sigma})")
        o = config.rssm
        self.config, self.options, self.z_dim, self.action_dim = config, o, z_dim, action_dim
        self.hidden = config.hidden
        self.discrete = o.classes > 0
        self.stoch_dim = o.stoch * o.classes if self.discrete else o.stoch
        dist_params = self.stoch_dim if self.discrete else 2 * o.stoch
        self.feature_dim = self.hidden + self.stoch_dim
        self.inp = nn.Sequential(nn.Linear(self.stoch_dim + action_dim, o.units), nn.ELU())
        self.gru = nn.GRUCell(o.units, self.hidden)
        self.prior_net = _mlp(self.hidden, o.units, dist_params)
        self.posterior_net = _mlp(self.hidden + z_dim, o.units, dist_params)
        self.z_head = _mlp(self.feature_dim, o.units, 2 * z_dim)
        self.reward_head = _mlp(self.feature_dim, o.units, 1)
        self.done_head = _mlp(self.feature_dim, o.units, 1)

    def sizes(self) -> dict:
        """The sizes the data fixed (stored beside the config in a checkpoint)."""
        return {"z_dim": self.z_dim, "action_dim": self.action_dim}

    # ------------------------------------------------------------ distributions of s

    def _dist(self, out: torch.Tensor) -> D.Distribution:
        """Prior or posterior net output -> an Independent distribution over s (B, stoch_dim)."""
        o = self.options
        if self.discrete:
            logits = out.view(*out.shape[:-1], o.stoch, o.classes)
            probs = (1 - o.unimix) * logits.softmax(-1) + o.unimix / o.classes
            return D.Independent(D.OneHotCategoricalStraightThrough(probs=probs, validate_args=False), 1,
                                 validate_args=False)  # the nets' outputs are valid by construction: skip the checks
        mean, raw_std = out.chunk(2, dim=-1)
        return D.Independent(D.Normal(mean, F.softplus(raw_std) + o.min_std, validate_args=False), 1,
                             validate_args=False)

    def _sample(self, dist: D.Distribution, temperature: float = 1.0, generator=None) -> torch.Tensor:
        """A reparameterised (Gaussian) or straight-through (discrete) sample, flattened to (B, stoch_dim).
        temperature tau scales the Gaussian std by sqrt(tau) and divides the categorical log-probabilities by tau."""
        tau = max(float(temperature), 1e-6)
        base = dist.base_dist
        if not self.discrete:
            noise = torch.randn(base.loc.shape, generator=generator, dtype=base.loc.dtype, device=base.loc.device)
            return base.loc + base.scale * math.sqrt(tau) * noise
        probs = base.probs  # (B, stoch, classes)
        u = torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20)))  # Gumbel-max: argmax is a draw from softmax(logits / tau)
        index = (probs.detach().log() / tau + gumbel).argmax(-1)
        onehot = F.one_hot(index, probs.shape[-1]).to(probs.dtype)
        return (onehot + probs - probs.detach()).flatten(-2)  # straight-through gradient (Bengio et al. 2013)

    def _mode(self, dist: D.Distribution) -> torch.Tensor:
        base = dist.base_dist
        if not self.discrete:
            return base.loc
        probs = base.probs
        return F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype).flatten(-2)

    def _unflatten(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(*s.shape[:-1], self.options.stoch, self.options.classes) if self.discrete else s

    # ------------------------------------------------------------ the M interface

    def initial_state(self, batch: int) -> RSSMState:
        """h = 0 and s = 0 before the first observation: float32 (batch, hidden), (batch, stoch_dim)."""
        device = self.gru.weight_hh.device
        return torch.zeros(batch, self.hidden, device=device), torch.zeros(batch, self.stoch_dim, device=device)

    def observe(self, state: RSSMState, z: torch.Tensor, sample: bool = False, generator=None) -> RSSMState:
        """Fold the real latent z (B, z_dim) into the state: s from the posterior q(s | h, z), its mean (or mode)
        unless `sample`."""
        h, _ = state
        post = self._dist(self.posterior_net(torch.cat([h, z], -1)))
        return h, self._sample(post, 1.0, generator) if sample else self._mode(post)

    def features(self, state: RSSMState) -> torch.Tensor:
        """What C reads: [h, s] float32 (B, hidden + stoch_dim)."""
        return torch.cat(state, -1)

    def transition(self, state: RSSMState, a: torch.Tensor) -> RSSMState:
        """The deterministic step with action a (B, action_dim): h_{t+1}; s keeps s_t until observe or imagine."""
        h, s = state
        return self.gru(self.inp(torch.cat([s, a], -1)), h), s

    def imagine(self, state: RSSMState, temperature: float = 1.0, generator=None) -> RSSMState:
        """s_{t+1} sampled from the prior p(s | h_{t+1}) after `transition` (differentiable)."""
        h, _ = state
        return h, self._sample(self._dist(self.prior_net(h)), temperature, generator)

    def heads(self, state: RSSMState) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward (B,) for the action just taken and the logit (B,) that the episode ended with it."""
        feat = self.features(state)
        return self.reward_head(feat).squeeze(-1), self.done_head(feat).squeeze(-1)

    def latent(self, state: RSSMState) -> torch.Tensor:
        """The z (B, z_dim) the state stands for (the z head's mean), e.g. to decode through V."""
        return self.z_head(self.features(state))[..., : self.z_dim]

    # ------------------------------------------------------------ training

    def _z_nll(self, feat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """-log p(z | h, s) summed over z_dim: (..., F), (..., D) -> (...)."""
        return bounded_gaussian_nll(self.z_head(feat), z, self.config.min_log_sigma, self.config.max_log_sigma)

    def filter(self, z: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior rollout over a window: z (B, T+1, D), a (B, T, A) -> the features (B, T, F) of the states
        after each action, and the prior and posterior nets' outputs for s_1..s_T (B, T, P) (`_dist` reads them)."""
        h, _ = self.initial_state(len(z))
        s = self._sample(self._dist(self.posterior_net(torch.cat([h, z[:, 0]], -1))))
        feats, priors, posts = [], [], []
        for t in range(a.shape[1]):
            h, _ = self.transition((h, s), a[:, t])
            post = self.posterior_net(torch.cat([h, z[:, t + 1]], -1))
            s = self._sample(self._dist(post))
            feats.append(torch.cat([h, s], -1))
            priors.append(self.prior_net(h))
            posts.append(post)
        return torch.stack(feats, 1), torch.stack(priors, 1), torch.stack(posts, 1)

    def kl_terms(self, prior_out: torch.Tensor, post_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From the nets' outputs (B, T, P): (KL(q || p) (B, T) in nats, the balanced KL loss (B, T) with each
        side floored at free_nats)."""
        o = self.options
        p, q = self._dist(prior_out), self._dist(post_out)
        p_sg, q_sg = self._dist(prior_out.detach()), self._dist(post_out.detach())
        kl = D.kl_divergence(q, p)
        dyn = D.kl_divergence(q_sg, p)  # trains the prior towards the posterior
        rep = D.kl_divergence(q, p_sg)  # keeps the posterior near the prior
        balanced = o.kl_balance * dyn.clamp(min=o.free_nats) + (1 - o.kl_balance) * rep.clamp(min=o.free_nats)
        return kl, balanced

    def loss(self, z, a, reward, done, next_valid, step_valid, reward_weight: float = 1.0,
             done_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Masked training loss on a batch of windows (the arguments of models.mdnrnn.mdnrnn_loss).

        Returns scalars: `loss`, `nll` (negative ELBO of z_{t+1}, nats per latent dim per step), `z_nll`
        (the reconstruction part, same units), `kl` (nats per step, >= 0), `reward_mse`, `done_bce`.
        """
        feats, prior_out, post_out = self.filter(z, a)
        z_nll = self._z_nll(feats, z[:, 1:])  # (B, T)
        kl, kl_loss = self.kl_terms(prior_out, post_out)
        n_next = next_valid.sum().clamp(min=1)
        n_steps = step_valid.sum().clamp(min=1)
        mean_next = lambda x: (x * next_valid).sum() / n_next  # noqa: E731
        reward_pred, done_logit = self.reward_head(feats).squeeze(-1), self.done_head(feats).squeeze(-1)
        reward_mse = ((reward_pred - reward).pow(2) * step_valid).sum() / n_steps
        bce = F.binary_cross_entropy_with_logits(done_logit, done, reduction="none")
        done_bce = (bce * step_valid).sum() / n_steps
        loss = (mean_next(z_nll) + self.options.kl_weight * mean_next(kl_loss)) / self.z_dim
        loss = loss + reward_weight * reward_mse + done_weight * done_bce
        return {"loss": loss, "nll": mean_next(z_nll + kl) / self.z_dim, "z_nll": mean_next(z_nll) / self.z_dim,
                "kl": mean_next(kl), "reward_mse": reward_mse, "done_bce": done_bce}
