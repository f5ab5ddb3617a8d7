"""The method: vision V, memory M, controller C, the agent and the dream. Imports torch, numpy, gymnasium only.

- V: `vae.py` (ConvVAE, VAEConfig), `nvae.py` (NVAE, NVAEConfig), `likelihood.py` (p(x|z) and the pixel format)
- M: `mdnrnn.py` (MDNRNN, MDNRNNConfig, its loss), `rssm.py` (RSSM, RSSMConfig: Gaussian or discrete state),
  `tssm.py` (TSSM, TSSMConfig: a causal transformer with a key-value cache for imagination)
- C: `controller.py` (LinearController, its parameter layout and squashing), `actor_critic.py` (ActorCritic
  trained in imagination: lambda-returns, the imagination update)
- `ensemble.py` (MemoryEnsemble): K Ms of one kind behind the same interface (one member per dream rollout)
- `agent.py`: one V -> C -> M step on a V-ready frame; `dream.py`: M as a gymnasium.Env and the batched dream

The registries below name every kind a config may ask for; `build` makes a fresh model of a kind, and a
checkpoint dict (`checkpoint_dict` / `from_checkpoint_dict`) holds only tensors and plain types:
{"kind", "config" (the model's config dataclass as a dict), "sizes" (what the data fixed), "state_dict", ...}.
Reading and writing files is utils/checkpoints.py's job.

Every M kind has one interface, which the agent, the dream and C's training use (B: batch; a state is a
tuple of float32 tensors, batch first):

    state = M.initial_state(B)                     before the first observation
    state = M.observe(state, z)                    fold in the real latent z_t (B, z_dim) (filtering)
    x = M.features(state)                          what C reads, (B, M.feature_dim)
    state = M.transition(state, a)                 the deterministic step with action a_t (B, A), differentiable
    state = M.imagine(state, temperature, gen)     sample the next latent state from M's prior (dreaming)
    reward, done_logit = M.heads(state)            (B,) each: the reward for a_t and whether the episode ended
    z = M.latent(state)                            the z (B, z_dim) the state stands for (to decode through V)
    terms = M.loss(z, a, reward, done, next_valid, step_valid, ...)   stage 04's masked loss on windows
"""

from __future__ import annotations

import dataclasses

from models.actor_critic import ActorCritic
from models.controller import LinearController
from models.ensemble import MemoryEnsemble
from models.hparams import config_from_dict
from models.mdnrnn import MDNRNN
from models.nvae import NVAE
from models.rssm import RSSM
from models.tssm import TSSM
from models.vae import ConvVAE

VISION_KINDS = {"vae": ConvVAE, "nvae": NVAE}
MEMORY_KINDS = {"mdnrnn": MDNRNN, "rssm": RSSM, "tssm": TSSM}
CONTROLLER_KINDS = {"linear": LinearController, "actor_critic": ActorCritic}
FAMILIES = {"vision": VISION_KINDS, "memory": MEMORY_KINDS, "controller": CONTROLLER_KINDS}


def build(family: str, kind: str, config, **sizes):
    """A fresh model of `kind` in `family` (vision | memory | controller) from its config dataclass and the
    sizes the data fixed (vision: frame_size; memory: z_dim, action_dim, and members: K > 1 for a
    MemoryEnsemble of K independently initialised Ms; controller: in_dim, action bounds).

    Raises:
        ValueError: an unknown kind, or sizes and config the architecture cannot take.
    """
    kinds = FAMILIES[family]
    if kind not in kinds:
        raise ValueError(f"unknown {family} kind {kind!r} (expected one of: {', '.join(kinds)})")
    members = sizes.pop("members", 1) if family == "memory" else 1
    if members > 1:
        return MemoryEnsemble([kinds[kind](config, **sizes) for _ in range(members)])
    return kinds[kind](config, **sizes)


def checkpoint_dict(model, **extra) -> dict:
    """{kind, config, sizes, state_dict, **extra}: tensors and plain types only (loads with weights_only=True).

    Raises:
        ValueError: an extra that would replace one of the four model entries.
    """
    clash = {"kind", "config", "sizes", "state_dict"} & set(extra)
    if clash:
        raise ValueError(f"checkpoint extras may not replace {sorted(clash)}")
    return {"kind": model.kind, "config": dataclasses.asdict(model.config), "sizes": model.sizes(),
            "state_dict": model.state_dict(), **extra}


def from_checkpoint_dict(ckpt: dict, family: str):
    """Rebuild a model of `family` (eval mode, CPU) from `checkpoint_dict` output.

    Raises:
        ValueError: a kind not of `family`, a config or sizes that do not build, or weights that do not fit.
    """
    kinds = FAMILIES[family]
    kind = ckpt.get("kind")
    if kind not in kinds:
        raise ValueError(f"checkpoint of kind {kind!r}, expected a {family} checkpoint ({', '.join(kinds)})")
    cls = kinds[kind]
    try:
        config = config_from_dict(cls.config_class, ckpt["config"], f"{kind} config.")
        model = build(family, kind, config, **ckpt["sizes"])
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ValueError(f"weights do not fit a {kind} of this config ({str(exc).splitlines()[0]})") from None
    return model.eval()


def controller_for_world_model(config, feature_dim: int, action_low, action_high, info_dims: dict | None = None):
    """A fresh C of the kind whose config dataclass `config` is (LinearControllerConfig: linear; ActorCriticConfig:
    actor_critic), reading M's features (feature_dim) plus the env info entries its inputs name.

    Raises:
        ValueError: a config of no registered kind, or inputs the env does not give.
    """
    for cls in CONTROLLER_KINDS.values():
        if type(config) is cls.config_class:
            return cls.for_world_model(config, feature_dim, action_low, action_high, info_dims)
    raise ValueError(f"no controller kind has the config {type(config).__name__}")
