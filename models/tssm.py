"""Transformer state-space model M over V's latents (TransDreamer, Chen et al. 2022; see also IRIS and TWM).

A small causal transformer reads one token per step, e_t = W [z_t, a_t], and its
output h_t predicts z_{t+1} ~ N(mu(h_t), sigma(h_t)) (sigma bounded as M's
mixture sigmas), the reward r_t received for a_t and the logit that the
episode ends after a_t. C reads [z_t, h_{t-1}] (h_{-1} = 0), as with the
MDN-RNN. The token holds z and a only: the agent hands M the frame's z and the
action it took, and the reward is what M predicts. Each token attends to
itself and the `context` - 1 tokens before it; positions enter through rotary
embeddings (RoPE, Su et al. 2021) of the absolute step, so attention scores
depend on offsets only.

Imagination keeps each layer's keys and values of the last `context` tokens
in a cache of fixed size (a sliding window with a validity mask), so a step
costs one token, not the whole context, and computes exactly what `sequence`
computes for that token; `loss` runs whole windows at once with the same
causal, span-limited mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hparams import param
from models.mdnrnn import SequenceModelConfig, bounded_gaussian_nll

# (z (B, D), h (B, d_model), valid (B, context) bool, step (B,) long: the absolute position of the next token,
#  then per layer its keys and values (B, heads, context, head_dim): k_0, v_0, k_1, v_1, ...). One tensor per
#  layer rather than one stacked tensor: selecting a layer out of a stack costs a full-size zero fill in backward.
TSSMState = tuple[torch.Tensor, ...]


@dataclass
class TSSMOptions:
    """The TSSM's own hyperparameters (memory.tssm in a config)."""

    layers: int = param(2, "transformer blocks", minimum=1)
    heads: int = param(4, "attention heads per block (hidden must divide by it)", minimum=1)
    context: int = param(32, "tokens the model attends to (the key-value cache of imagination keeps this many)",
                         minimum=1)


@dataclass
class TSSMConfig(SequenceModelConfig):
    """The TSSM's config: its width (hidden) and the z head's sigma bounds (shared with every M kind), plus `tssm`."""

    tssm: TSSMOptions = param(TSSMOptions(), "memory.kind tssm only")


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x (..., T, d) with d even, positions (..., T) float -> x rotated pairwise by angles
    position / 10000^(2i/d)."""
    d = x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, d, 2, device=x.device, dtype=x.dtype) / d)  # (d/2,)
    angles = positions[..., None] * freqs  # (..., T, d/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row: q (B, heads, 1, d), k and v (B, heads, C, d), valid (B, C) bool ->
    (B, heads, 1, d). Written out because CPU torch's fused attention backward zero-fills buffers of the whole
    cache for a single query, which was most of an imagination update."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, 1, C)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention with rotary positions, then a 4x MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def qkv_heads(self, x: torch.Tensor, positions: torch.Tensor):
        """x (B, T, W), positions (B, T) -> q, k (rotated), v, each (B, heads, T, head_dim)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        pos = positions[:, None, :].to(x.dtype)
        return rotate(q, pos), rotate(k, pos), v

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual of the attention output (B, heads, T, head_dim), then the MLP."""
        B, _, T, _ = attended.shape
        x = x + self.proj(attended.transpose(1, 2).reshape(B, T, -1))
        return x + self.mlp(self.norm2(x))


class TSSM(nn.Module):
    """Causal transformer M over (z, a) tokens; see the module docstring.

    Args:
        config: TSSMConfig (hidden = d_model).
        z_dim, action_dim: sizes the data fixed.

    Raises:
        ValueError: min_log_sigma >= max_log_sigma; hidden not divisible by heads, or an odd head size.
    """

    kind = "tssm"
    config_class = TSSMConfig

    def __init__(self, config: TSSMConfig | None = None, z_dim: int = 32, action_dim: int = 3):
        super().__init__()
        config = config or TSSMConfig()
        o = config.tssm
        if not config.min_log_sigma < config.max_log_sigma:
            raise ValueError(f"memory.min_log_sigma ({config.min_log_sigma}) must be below memory.max_log_sigma "
                             f"({config.max_log_sigma})")
        if config.hidden % o.heads or (config.hidden // o.heads) % 2:
            raise ValueError(f"memory.hidden ({config.hidden}) must split into memory.tssm.heads ({o.heads}) heads "
                             "of an even size")
        self.config, self.options, self.z_dim, self.action_dim = config, o, z_dim, action_dim
        self.hidden, self.context = config.hidden, o.context
        self.feature_dim = z_dim + self.hidden
        self.embed = nn.Linear(z_dim + action_dim, self.hidden)
        self.blocks = nn.ModuleList(Block(self.hidden, o.heads) for _ in range(o.layers))
        self.norm = nn.LayerNorm(self.hidden)
        self.z_head = nn.Linear(self.hidden, 2 * z_dim)
        self.reward_head = nn.Linear(self.hidden, 1)
        self.done_head = nn.Linear(self.hidden, 1)

    def sizes(self) -> dict:
        """The sizes the data fixed (stored beside the config in a checkpoint)."""
        return {"z_dim": self.z_dim, "action_dim": self.action_dim}

    # ------------------------------------------------------------ whole sequences (training, reference)

    def sequence(self, z: torch.Tensor, a: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Outputs h (B, T, hidden) for tokens [z_t, a_t] (B, T, D + A) at positions start..start+T-1, each token
        attending to itself and the `context` - 1 tokens before it."""
        B, T, _ = z.shape
        x = self.embed(torch.cat([z, a], dim=-1))
        positions = torch.arange(start, start + T, device=z.device).expand(B, T)
        offset = torch.arange(T, device=z.device)
        allowed = (offset[None, :] <= offset[:, None]) & (offset[:, None] - offset[None, :] < self.context)
        for block in self.blocks:
            q, k, v = block.qkv_heads(x, positions)
            x = block.finish(x, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
        return self.norm(x)

    def _z_nll(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return bounded_gaussian_nll(self.z_head(h), z, self.config.min_log_sigma, self.config.max_log_sigma)

    def loss(self, z, a, reward, done, next_valid, step_valid, reward_weight: float = 1.0,
             done_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Masked training loss on a batch of windows (the arguments of models.mdnrnn.mdnrnn_loss). Returns
        scalars: `loss`, `nll` (-log p(z_{t+1}), nats per latent dim per step), `reward_mse`, `done_bce`."""
        h = self.sequence(z[:, :-1], a)
        nll = (self._z_nll(h, z[:, 1:]) * next_valid).sum() / next_valid.sum().clamp(min=1) / self.z_dim
        n_steps = step_valid.sum().clamp(min=1)
        reward_mse = ((self.reward_head(h).squeeze(-1) - reward).pow(2) * step_valid).sum() / n_steps
        bce = F.binary_cross_entropy_with_logits(self.done_head(h).squeeze(-1), done, reduction="none")
        done_bce = (bce * step_valid).sum() / n_steps
        loss = nll + reward_weight * reward_mse + done_weight * done_bce
        return {"loss": loss, "nll": nll, "reward_mse": reward_mse, "done_bce": done_bce}

    # ------------------------------------------------------------ the M interface, one token a step

    def initial_state(self, batch: int) -> TSSMState:
        """An empty cache: z = 0, h = 0, no valid key, the next token at position 0."""
        device = self.embed.weight.device
        o = self.options
        empty = torch.zeros(batch, o.heads, self.context, self.hidden // o.heads, device=device)
        return (torch.zeros(batch, self.z_dim, device=device), torch.zeros(batch, self.hidden, device=device),
                torch.zeros(batch, self.context, dtype=torch.bool, device=device),
                torch.zeros(batch, dtype=torch.long, device=device), *[empty.clone() for _ in range(2 * o.layers)])

    def observe(self, state: TSSMState, z: torch.Tensor, sample: bool = False, generator=None) -> TSSMState:
        """Take the real latent z (B, z_dim) as the current one."""
        return (z, *state[1:])

    def features(self, state: TSSMState) -> torch.Tensor:
        """What C reads: [z_t, h_{t-1}] float32 (B, z_dim + hidden)."""
        return torch.cat([state[0], state[1]], dim=-1)

    def transition(self, state: TSSMState, a: torch.Tensor) -> TSSMState:
        """Append the token [z_t, a_t] to the cache (the oldest leaves when it is full) and compute its output
        h_t attending over the cache: one token of work."""
        z, _, valid, step, *cache = state
        x = self.embed(torch.cat([z, a], dim=-1))[:, None]  # (B, 1, W)
        valid = torch.cat([valid[:, 1:], torch.ones_like(valid[:, :1])], dim=1)
        new_cache = []
        for i, block in enumerate(self.blocks):
            q, k, v = block.qkv_heads(x, step[:, None])
            k_i = torch.cat([cache[2 * i][:, :, 1:], k], dim=2)  # (B, heads, context, head_dim)
            v_i = torch.cat([cache[2 * i + 1][:, :, 1:], v], dim=2)
            x = block.finish(x, attend_one(q, k_i, v_i, valid))
            new_cache += [k_i, v_i]
        return (z, self.norm(x)[:, 0], valid, step + 1, *new_cache)

    def imagine(self, state: TSSMState, temperature: float = 1.0, generator=None) -> TSSMState:
        """z_{t+1} ~ N(mu(h_t), sigma(h_t)^2 tau) after `transition` (reparameterised: differentiable)."""
        h = state[1]
        mu, raw = self.z_head(h).chunk(2, dim=-1)
        span = self.config.max_log_sigma - self.config.min_log_sigma
        sigma = torch.exp(self.config.min_log_sigma + span * torch.sigmoid(raw)) * max(float(temperature), 1e-6) ** 0.5
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return (mu + sigma * noise, *state[1:])

    def heads(self, state: TSSMState) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward (B,) for the action just taken and the logit (B,) that the episode ended with it (from h_t)."""
        h = state[1]
        return self.reward_head(h).squeeze(-1), self.done_head(h).squeeze(-1)

    def latent(self, state: TSSMState) -> torch.Tensor:
        """The z (B, z_dim) of the state, e.g. to decode through V."""
        return state[0]
