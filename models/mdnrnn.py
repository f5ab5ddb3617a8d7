"""MDN-RNN memory model M (Ha & Schmidhuber 2018, section 2.2; Graves 2013).

An LSTM reads [z_t, a_t] and its hidden state h_t parameterises

- p(z_{t+1} | z_<=t, a_<=t): for each latent dimension d independently, a
  mixture of K one-dimensional Gaussians with its own mixture weights
  (pi_{d,k}, mu_{d,k}, sigma_{d,k}), i.e. a product over d of mixtures;
- the reward r_t received for a_t (a scalar regression head);
- the done logit: whether the episode terminates after a_t.

Each sigma is bounded to [exp(min_log_sigma), exp(max_log_sigma)] through a
sigmoid, and the mixture likelihood is computed with logsumexp, so the loss
cannot run off to large negative values or overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hparams import param

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LSTMState = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (1, B, hidden): nn.LSTM's form
MDNState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (h, c) each (B, hidden), z (B, z_dim)


class MixtureParams(NamedTuple):
    """Per-dimension Gaussian mixtures; every field float (..., D, K)."""

    logit_pi: torch.Tensor  # unnormalised log mixture weights
    mu: torch.Tensor
    log_sigma: torch.Tensor


def mdn_nll(params: MixtureParams, target: torch.Tensor) -> torch.Tensor:
    """-log p(target) under the per-dimension mixtures, summed over D.

    target float (..., D); params fields (..., D, K). Returns float (...), nats.
    Equal to -MixtureSameFamily(Categorical(logits=logit_pi),
    Normal(mu, exp(log_sigma))).log_prob(target).sum(-1).

    With log pi_k = logit_k - logsumexp(logit), log sum_k pi_k N_k is
    logsumexp(logit + log N) - logsumexp(logit): the same quantity without a
    log_softmax over (..., D, K) and its backward (5 % of a training step).
    """
    t = target.unsqueeze(-1)  # (..., D, 1)
    log_normal = -0.5 * ((t - params.mu) * torch.exp(-params.log_sigma)).pow(2) - params.log_sigma
    log_mixture = torch.logsumexp(params.logit_pi + log_normal, dim=-1) - torch.logsumexp(params.logit_pi, dim=-1)
    return target.shape[-1] * HALF_LOG_2PI - log_mixture.sum(dim=-1)


def mdn_sample(params: MixtureParams, temperature: float = 1.0, generator=None) -> torch.Tensor:
    """Draw z ~ mixture at temperature tau (Ha & Schmidhuber): logits / tau, sigma * sqrt(tau).

    params fields (B, D, K) -> float (B, D). tau -> 0 gives the mean of the most
    likely component.
    """
    tau = max(float(temperature), 1e-6)
    probs = F.softmax(params.logit_pi / tau, dim=-1)  # (B, D, K)
    flat = probs.reshape(-1, probs.shape[-1])
    k = torch.multinomial(flat, 1, generator=generator).view(*probs.shape[:-1], 1)
    mu = params.mu.gather(-1, k).squeeze(-1)
    sigma = params.log_sigma.gather(-1, k).squeeze(-1).exp() * math.sqrt(tau)
    noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + sigma * noise


@dataclass
class SequenceModelConfig:
    """What every M kind shares: the width of h and the bounds of the sigmas it predicts for z."""

    hidden: int = param(256, "units of h: the LSTM of the MDN-RNN (C reads [z, h]), the GRU of the RSSM, the "
                        "width of the TSSM", minimum=1)
    min_log_sigma: float = param(-5.0, "each sigma of M's prediction of z (mixture components; the RSSM's and the "
                                 "TSSM's z head) is bounded to [exp(min_log_sigma), exp(max_log_sigma)]")
    max_log_sigma: float = param(2.0, "upper bound of log sigma (see min_log_sigma)")


def bounded_gaussian_nll(out: torch.Tensor, z: torch.Tensor, min_log_sigma: float, max_log_sigma: float
                         ) -> torch.Tensor:
    """-log N(z; mu, sigma) summed over the last dim, for a head output out (..., 2D) = [mu, raw sigma] whose
    log sigma is min_log_sigma + (max - min) sigmoid(raw) (the RSSM's and the TSSM's z heads). z (..., D) ->
    float (...), nats."""
    mu, raw = out.chunk(2, dim=-1)
    log_sigma = min_log_sigma + (max_log_sigma - min_log_sigma) * torch.sigmoid(raw)
    return (0.5 * ((z - mu) * torch.exp(-log_sigma)).pow(2) + log_sigma + HALF_LOG_2PI).sum(-1)


@dataclass
class MDNRNNConfig(SequenceModelConfig):
    """M's hyperparameters. z_dim and action_dim are not among them: they come from the latents."""

    gaussians: int = param(5, "mdnrnn: mixture components per latent dimension", minimum=1)


class MDNRNN(nn.Module):
    """LSTM + mixture density head for z_{t+1}, plus reward and done heads.

    Args:
        config: MDNRNNConfig (hidden: LSTM units, 256 in the paper; gaussians: K mixture components per
            latent dimension, 5).
        z_dim: latent size D; action_dim: A.

    Raises:
        ValueError: min_log_sigma >= max_log_sigma.
    """

    kind = "mdnrnn"
    config_class = MDNRNNConfig

    def __init__(self, config: MDNRNNConfig | None = None, z_dim: int = 32, action_dim: int = 3):
        super().__init__()
        config = config or MDNRNNConfig()
        if not config.min_log_sigma < config.max_log_sigma:
            raise ValueError(f"mdnrnn.min_log_sigma ({config.min_log_sigma}) must be below mdnrnn.max_log_sigma "
                             f"({config.max_log_sigma})")
        self.config, self.z_dim, self.action_dim = config, z_dim, action_dim
        self.hidden, self.gaussians = config.hidden, config.gaussians
        self.min_log_sigma, self.max_log_sigma = config.min_log_sigma, config.max_log_sigma
        self.lstm = nn.LSTM(z_dim + action_dim, self.hidden, batch_first=True)
        self.mdn_head = nn.Linear(self.hidden, 3 * z_dim * self.gaussians)
        self.reward_head = nn.Linear(self.hidden, 1)
        self.done_head = nn.Linear(self.hidden, 1)

    def sizes(self) -> dict:
        """The sizes the data fixed (stored beside the config in a checkpoint)."""
        return {"z_dim": self.z_dim, "action_dim": self.action_dim}

    def _mixture(self, h: torch.Tensor) -> MixtureParams:
        """h (..., hidden) -> the mixture of z_{t+1}, fields (..., D, K), sigmas bounded."""
        out = self.mdn_head(h).view(*h.shape[:-1], self.z_dim, 3, self.gaussians)
        logit_pi, mu, raw_sigma = out.unbind(dim=-2)  # each (..., D, K)
        span = self.max_log_sigma - self.min_log_sigma
        return MixtureParams(logit_pi, mu, self.min_log_sigma + span * torch.sigmoid(raw_sigma))

    def _heads(self, h: torch.Tensor) -> tuple[MixtureParams, torch.Tensor, torch.Tensor]:
        return self._mixture(h), self.reward_head(h).squeeze(-1), self.done_head(h).squeeze(-1)

    def forward(
        self, z: torch.Tensor, a: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[MixtureParams, torch.Tensor, torch.Tensor, LSTMState]:
        """Sequence API. z (B, T, D), a (B, T, A) float32 -> mixture params (B, T, D, K),
        reward (B, T), done logit (B, T), final LSTM state."""
        h, state = self.lstm(torch.cat([z, a], dim=-1), state)  # h (B, T, hidden)
        params, reward, done_logit = self._heads(h)
        return params, reward, done_logit, state

    # ------------------------------------------------------------ the M interface (models/__init__.py)

    @property
    def feature_dim(self) -> int:
        """Size of what C reads, [z, h]: z_dim + hidden."""
        return self.z_dim + self.hidden

    def initial_state(self, batch: int) -> MDNState:
        """h = c = 0 and z = 0 before the first observation: float32 (batch, hidden) x 2, (batch, z_dim)."""
        device = self.mdn_head.weight.device
        zeros = torch.zeros(batch, self.hidden, device=device)
        return zeros, zeros.clone(), torch.zeros(batch, self.z_dim, device=device)

    def observe(self, state: MDNState, z: torch.Tensor, sample: bool = False, generator=None) -> MDNState:
        """Take the real latent z (B, z_dim) as the current one (the MDN-RNN has no posterior: `sample` and
        `generator` are accepted for the common interface)."""
        h, c, _ = state
        return h, c, z

    def features(self, state: MDNState) -> torch.Tensor:
        """What C reads: [z_t, h_t] float32 (B, z_dim + hidden) (Ha & Schmidhuber, fig. 8)."""
        h, _, z = state
        return torch.cat([z, h], dim=-1)

    def transition(self, state: MDNState, a: torch.Tensor) -> MDNState:
        """The LSTM step on [z_t, a_t], a (B, action_dim) -> h_{t+1}, c_{t+1}; z keeps z_t until observe or
        imagine."""
        h, c, z = state
        _, (h, c) = self.lstm(torch.cat([z, a], dim=-1)[:, None], (h[None], c[None]))
        return h[0], c[0], z

    def imagine(self, state: MDNState, temperature: float = 1.0, generator=None) -> MDNState:
        """z_{t+1} sampled from the mixture of h_{t+1} at temperature tau (`mdn_sample`), after `transition`."""
        h, c, _ = state
        return h, c, mdn_sample(self._mixture(h), temperature, generator)

    def heads(self, state: MDNState) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward (B,) for the action just taken and the logit (B,) that the episode ended with it (from h)."""
        h = state[0]
        return self.reward_head(h).squeeze(-1), self.done_head(h).squeeze(-1)

    def latent(self, state: MDNState) -> torch.Tensor:
        """The z (B, z_dim) of the state, e.g. to decode through V."""
        return state[2]

    def loss(self, z, a, reward, done, next_valid, step_valid, reward_weight: float = 1.0,
             done_weight: float = 1.0, open_loop_horizon: int = 0, open_loop_weight: float = 1.0
             ) -> dict[str, torch.Tensor]:
        """`mdnrnn_loss` of this model (the training call every M kind has), plus `open_loop_terms` weighted by
        open_loop_weight when open_loop_horizon >= 2."""
        terms = mdnrnn_loss(self, z, a, reward, done, next_valid, step_valid, reward_weight, done_weight)
        if open_loop_horizon >= 2:
            extra = open_loop_terms(self, z, a, reward, done, next_valid, step_valid, open_loop_horizon)
            dream_loss = extra["open_loop_nll"] + reward_weight * extra["open_loop_reward_mse"] \
                + done_weight * extra["open_loop_done_bce"]
            terms = {**terms, **extra, "loss": terms["loss"] + open_loop_weight * dream_loss}
        return terms


def mdnrnn_loss(
    model: MDNRNN,
    z: torch.Tensor,
    a: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    next_valid: torch.Tensor,
    step_valid: torch.Tensor,
    reward_weight: float = 1.0,
    done_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Masked training loss on a batch of windows.

    z float (B, T+1, D): latents z_0..z_T (z_T may be padding); a (B, T, A);
    reward, done float (B, T); next_valid (B, T): 1 where z_{t+1} is real;
    step_valid (B, T): 1 where step t is real. Returns scalars: `nll` (nats
    per latent dim per step), `reward_mse`, `done_bce` and their weighted sum
    `loss`.
    """
    params, reward_pred, done_logit, _ = model(z[:, :-1], a)
    nll = mdn_nll(params, z[:, 1:])  # (B, T)
    nll = (nll * next_valid).sum() / next_valid.sum().clamp(min=1) / model.z_dim
    n_steps = step_valid.sum().clamp(min=1)
    reward_mse = ((reward_pred - reward).pow(2) * step_valid).sum() / n_steps
    bce = F.binary_cross_entropy_with_logits(done_logit, done, reduction="none")
    done_bce = (bce * step_valid).sum() / n_steps
    loss = nll + reward_weight * reward_mse + done_weight * done_bce
    return {"loss": loss, "nll": nll, "reward_mse": reward_mse, "done_bce": done_bce}


def open_loop_starts(steps: int, horizon: int) -> list[int]:
    """Where `open_loop_terms` starts its open-loop runs in a window of `steps` steps: every horizon // 2 steps
    from step horizon // 2 on, so that each run starts from an h that has filtered at least that many real
    frames (a dream starts from a filtered h too; from h = 0 a mid-episode frame leaves the car's speed
    unknown), and runs overlap by half. Raises ValueError unless 2 <= horizon < steps."""
    if not 2 <= horizon < steps:
        raise ValueError(f"open_loop_horizon must be at least 2 and below the window's {steps} steps, got {horizon}")
    return list(range(horizon // 2, steps - 1, horizon // 2))


def open_loop_terms(
    model: MDNRNN,
    z: torch.Tensor,
    a: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    next_valid: torch.Tensor,
    step_valid: torch.Tensor,
    horizon: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """M's losses on its own dream: the real actions, but z imagined by M after the first step.

    The teacher-forced loss (`mdnrnn_loss`) only ever shows the LSTM the real z_t, while a dream feeds it
    z sampled from its own mixtures, so the imagined h drifts to states no training step reached, and the
    reward head is queried there. This is the MDN-RNN's form of the multi-step prediction losses of
    PlaNet's overshooting (Hafner et al. 2019, section 4) and of scheduled sampling (Bengio et al. 2015,
    here with every input after the first sampled): from the teacher-forced state at each start
    (`open_loop_starts`), M reads the real z_s and a_s, then for j = 1 .. horizon - 1 reads a z it sampled
    itself at tau 1 (`mdn_sample`, reparameterised through mu and sigma; the component draw passes no
    gradient) with the real a_{s+j}, and is scored on the real z_{s+j+1}, r_{s+j} and done_{s+j}. Runs stop
    at the window's end.

    Arguments as `mdnrnn_loss` (z float (B, T+1, D); a (B, T, A); reward, done, next_valid, step_valid
    float (B, T)); horizon: steps per run, 2 <= horizon < T; generator draws the samples (None: torch's
    global RNG).
    Returns scalars over the open-loop steps only (j >= 1): `open_loop_nll` (nats per latent dim per step),
    `open_loop_reward_mse`, `open_loop_done_bce`.

    Raises:
        ValueError: horizon < 2 or >= T.
    """
    B, T = a.shape[:2]
    starts = open_loop_starts(T, horizon)
    inputs = torch.cat([z[:, :-1], a], dim=-1)
    h0, c0, state, prev = [], [], None, 0
    for s in starts:  # the teacher-forced (h, c) before each start's step (every start is > 0)
        _, state = model.lstm(inputs[:, prev:s], state)
        prev = s
        h, c = state
        h0.append(h)
        c0.append(c)
    n = len(starts)
    state = (torch.cat(h0, dim=1), torch.cat(c0, dim=1))  # (1, n * B, hidden), start-major
    step = torch.as_tensor(starts, device=a.device)[:, None] + torch.arange(horizon, device=a.device)  # (n, k)
    inside = (step < T).float()
    step = step.clamp(max=T - 1)
    take = lambda x: x[:, step].transpose(0, 1).reshape(n * B, horizon, *x.shape[2:])  # noqa: E731  (n*B, k, ...)
    mask = inside.repeat_interleave(B, dim=0)  # (n*B, k)
    acts, targets = take(a), take(z[:, 1:])
    rewards, dones, step_mask, next_mask = take(reward), take(done), take(step_valid) * mask, take(next_valid) * mask
    z_in = take(z[:, :-1])[:, 0]
    nll, reward_err, done_err = [], [], []
    for j in range(horizon):
        _, state = model.lstm(torch.cat([z_in, acts[:, j]], dim=-1)[:, None], state)
        h = state[0][0]
        params = model._mixture(h)
        if j:
            nll.append(mdn_nll(params, targets[:, j]))
            reward_err.append((model.reward_head(h).squeeze(-1) - rewards[:, j]).pow(2))
            done_err.append(F.binary_cross_entropy_with_logits(model.done_head(h).squeeze(-1), dones[:, j],
                                                               reduction="none"))
        z_in = mdn_sample(params, 1.0, generator)
    step_mask, next_mask = step_mask[:, 1:], next_mask[:, 1:]
    per_step = lambda x, m: (torch.stack(x, dim=1) * m).sum() / m.sum().clamp(min=1)  # noqa: E731
    return {"open_loop_nll": per_step(nll, next_mask) / model.z_dim,
            "open_loop_reward_mse": per_step(reward_err, step_mask),
            "open_loop_done_bce": per_step(done_err, step_mask)}


def smoothed_rewards(rewards: np.ndarray, sigma: float) -> np.ndarray:
    """The reward target of M's reward head, smoothed along one episode by a Gaussian kernel (DreamSmooth,
    Lee, Abbeel and Lee, ICLR 2024, section 4).

    A sparse reward such as CarRacing's +1000/N per new tile arrives on single steps that M cannot time
    from a 64x64 frame; its expected value per step (how fast tiles are being visited) is what a dream
    return needs, and the smoothed target carries it with far less noise. Each reward is spread over the
    steps of its own episode within 4 sigma, with the kernel renormalised over those steps, so the
    episode's return is conserved exactly (a terminal penalty is spread backwards, not amplified).

    rewards: float (T,) of one episode. sigma: the kernel's standard deviation in steps; 0 returns the
    rewards unchanged. Returns float32 (T,).

    Raises:
        ValueError: sigma < 0 or rewards not one-dimensional.
    """
    rewards = np.asarray(rewards, np.float64)
    if sigma < 0 or rewards.ndim != 1:
        raise ValueError(f"expected sigma >= 0 and rewards (T,), got sigma {sigma} and shape {rewards.shape}")
    if sigma == 0 or len(rewards) == 0:
        return rewards.astype(np.float32)
    half = int(math.ceil(4 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    T = len(rewards)
    weight_inside = np.convolve(np.ones(T), kernel)[half : half + T]  # per source step: its kernel mass in [0, T)
    return np.convolve(rewards / weight_inside, kernel)[half : half + T].astype(np.float32)
