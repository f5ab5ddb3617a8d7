"""An ensemble of M: K independently initialised members of one kind behind the M interface.

A C trained by CMA-ES in the dream of a single M finds the actions where that M is wrong in its favour (on
CarRacing-v3 here, a dream return of 510 for a C that scores 61 in the real env). Members fitted to the same
data from different initialisations agree where the data pins them and disagree elsewhere, so a C whose dream
episodes are spread over the members cannot exploit any one of them: Model-Ensemble TRPO (Kurutach, Clavera,
Duan, Tamar and Abbeel, ICLR 2018, section 4.2) samples one member per imagined rollout for this.

ME-TRPO's policy reads the true state; ours reads M's features ([z, h] for the MDN-RNN), and the h of
independently initialised members have nothing in common. So the roles are split, as in the real env:

- member 0 is the agent's memory: it filters the z sequence of every row, and C reads its features;
- the world of row b is member b % K: it gives the next z (which member 0 then observes, as it observes a
  real frame's z), the reward and the done.

A row of member k is member 0's agent driving in member k's world. For the MDN-RNN, whose observe only sets
z, a row of member 0 is exactly a single-M dream; for the other kinds the agent's state there is what member
0's observe makes of the imagined z (the RSSM: its posterior), as of a real frame's z. With batch 1 (a C in the real env) the agent is member 0 alone. Training (`loss`) fits every member
to the whole batch and averages their terms; the members differ by their initialisation only.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MemoryEnsemble(nn.Module):
    """K Ms of one kind and config with the interface of models/__init__.py.

    Args:
        members: K >= 2 freshly built (or loaded) Ms of the same kind, config and sizes.

    Row b's world is member b % K; member 0 is the agent (C reads its features) on every row (module docstring).
    Attributes kind, config, config_class, z_dim, action_dim and feature_dim are the members'; `sizes()` adds
    {"members": K}, so a checkpoint records K and rebuilds the ensemble (models.from_checkpoint_dict).

    Raises:
        ValueError: fewer than 2 members, or members of different kinds, configs or sizes.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"memory.ensemble: an ensemble needs at least 2 members, got {len(members)}")
        first = members[0]
        if any((m.kind, m.config, m.sizes()) != (first.kind, first.config, first.sizes()) for m in members):
            raise ValueError("memory.ensemble: every member must have the same kind, config and sizes")
        self.members = nn.ModuleList(members)
        self.kind, self.config, self.config_class = first.kind, first.config, first.config_class
        self.z_dim, self.action_dim, self.feature_dim = first.z_dim, first.action_dim, first.feature_dim

    def sizes(self) -> dict:
        """The members' sizes plus {"members": K} (stored in a checkpoint)."""
        return {**self.members[0].sizes(), "members": len(self.members)}

    def _served(self, batch: int):
        """(member, row slice) for every member that serves at least one of `batch` rows: rows k, k+K, ..."""
        k = len(self.members)
        return [(m, slice(i, None, k)) for i, m in enumerate(self.members) if i < batch]

    @staticmethod
    def _rows(state, rows: slice):
        return tuple(part[rows] for part in state)

    @staticmethod
    def _merge(parts: list, batch: int):
        """Member outputs (a tensor or a tuple of tensors each, for its rows) -> one output of `batch` rows."""
        def merged(pieces):
            first = pieces[0][1]
            out = first.new_empty((batch, *first.shape[1:]))
            for rows, piece in pieces:
                out[rows] = piece
            return out

        if isinstance(parts[0][1], tuple):
            return tuple(merged([(rows, out[j]) for rows, out in parts]) for j in range(len(parts[0][1])))
        return merged(parts)

    def _map(self, fn, state, *row_args):
        """fn(member, member's rows of state, member's rows of each row_arg) for every member, merged."""
        batch = len(state[0])
        parts = [(rows, fn(m, self._rows(state, rows), *(x[rows] for x in row_args))) for m, rows in self._served(batch)]
        return self._merge(parts, batch)

    # ------------------------------------------------------------ the M interface (models/__init__.py)
    # A state is the world's parts (row b: member b % K) followed by the agent's (member 0, every row).

    def _split(self, state):
        n = len(state) // 2
        return state[:n], state[n:]

    def initial_state(self, batch: int):
        """Each row's world and member 0 before the first observation: the members' state parts, batch first."""
        parts = [(rows, m.initial_state(len(range(batch)[rows]))) for m, rows in self._served(batch)]
        return self._merge(parts, batch) + self.members[0].initial_state(batch)

    def observe(self, state, z: torch.Tensor, sample: bool = False, generator=None):
        """Both the world and the agent fold in the real latent z (B, z_dim)."""
        world, agent = self._split(state)
        world = self._map(lambda m, s, z_rows: m.observe(s, z_rows, sample, generator), world, z)
        return world + self.members[0].observe(agent, z, sample, generator)

    def features(self, state) -> torch.Tensor:
        """What C reads: member 0's features, (B, feature_dim)."""
        return self.members[0].features(self._split(state)[1])

    def transition(self, state, a: torch.Tensor):
        """The deterministic step with action a float32 (B, action_dim), in each row's world and in member 0."""
        world, agent = self._split(state)
        world = self._map(lambda m, s, a_rows: m.transition(s, a_rows), world, a)
        return world + self.members[0].transition(agent, a)

    def imagine(self, state, temperature: float = 1.0, generator=None):
        """Each row's world samples the next z at temperature tau; the agent observes it."""
        world, agent = self._split(state)
        world = self._map(lambda m, s: m.imagine(s, temperature, generator), world)
        return world + self.members[0].observe(agent, self._map(lambda m, s: m.latent(s), world))

    def heads(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward and done logit (B,) each, from each row's world."""
        return self._map(lambda m, s: m.heads(s), self._split(state)[0])

    def latent(self, state) -> torch.Tensor:
        """The world's z (B, z_dim)."""
        return self._map(lambda m, s: m.latent(s), self._split(state)[0])

    def loss(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Every member's loss on the whole batch; each term is the mean over members (so `loss` and `nll` read
        as one M's, and each member gets the gradient of its own loss / K)."""
        terms = [m.loss(*args, **kwargs) for m in self.members]
        return {name: torch.stack([t[name] for t in terms]).mean() for name in terms[0]}


class PenalisedEnsemble(nn.Module):
    """The uncertainty-penalised dream of an ensemble M: MOPO's r~ = r - lambda u (Yu, Thomas, Yu, Ermon, Zou,
    Levine, Finn and Ma, NeurIPS 2020, eq. 4), with u the spread of the members' predicted rewards.

    The mean fitness of an ensemble dream lets through an error most members share; the worst member's
    (EPOpt) is as noisy as its few rollouts. MOPO instead charges every imagined step for how much the
    models disagree there: where the data pins M down the members agree and the reward is nearly M's own,
    off the data they drift apart and the step costs lambda * u. Here u is the standard deviation over the
    K members of their predicted reward for the step (MOPO's u is the largest predicted next-state sigma;
    the members' reward spread is what a dream return is made of, and every M kind has a reward head).

    To have every member's prediction on every row, every member filters every row (K member steps per
    row and step, against 2 in MemoryEnsemble): row b's world is still member b % K, which gives the next z;
    the others observe that z as they would a real frame's, and C reads member 0's features. With lambda 0
    and the MDN-RNN (whose observe only sets z) the dream is exactly MemoryEnsemble's for the same generator.

    Args:
        ensemble: a MemoryEnsemble (its members are shared, not copied).
        penalty: lambda >= 0, in reward units per unit of u.

    `heads` gives the penalised reward; the other methods follow the M interface of models/__init__.py.

    Raises:
        ValueError: a negative penalty, or a memory that is not a MemoryEnsemble.
    """

    def __init__(self, ensemble: MemoryEnsemble, penalty: float):
        super().__init__()
        if not isinstance(ensemble, MemoryEnsemble):
            raise ValueError("the disagreement penalty needs an ensemble M (memory.ensemble >= 2)")
        if penalty < 0:
            raise ValueError(f"the disagreement penalty must be >= 0, got {penalty}")
        self.members, self.penalty = ensemble.members, float(penalty)
        self.kind, self.config, self.config_class = ensemble.kind, ensemble.config, ensemble.config_class
        self.z_dim, self.action_dim, self.feature_dim = ensemble.z_dim, ensemble.action_dim, ensemble.feature_dim

    # A state is member 0's parts, then member 1's, ...: every member's state of all B rows.

    def _per_member(self, state) -> list[tuple]:
        n = len(state) // len(self.members)
        return [tuple(state[i * n : (i + 1) * n]) for i in range(len(self.members))]

    def _each(self, fn, state) -> tuple:
        return tuple(part for m, s in zip(self.members, self._per_member(state)) for part in fn(m, s))

    def initial_state(self, batch: int):
        """Every member before the first observation, batch rows each."""
        return tuple(part for m in self.members for part in m.initial_state(batch))

    def observe(self, state, z: torch.Tensor, sample: bool = False, generator=None):
        """Every member folds in the real latent z (B, z_dim)."""
        return self._each(lambda m, s: m.observe(s, z, sample, generator), state)

    def features(self, state) -> torch.Tensor:
        """What C reads: member 0's features, (B, feature_dim)."""
        return self.members[0].features(self._per_member(state)[0])

    def transition(self, state, a: torch.Tensor):
        """Every member's deterministic step with action a float32 (B, action_dim)."""
        return self._each(lambda m, s: m.transition(s, a), state)

    def _worlds(self, batch: int):
        k = len(self.members)
        return [(i, slice(i, None, k)) for i in range(min(k, batch))]

    def imagine(self, state, temperature: float = 1.0, generator=None):
        """Row b's world (member b % K) samples the next z at tau; every other member observes it. The members
        draw in order 0..K-1, as in MemoryEnsemble.imagine."""
        states = self._per_member(state)
        batch = len(states[0][0])
        imagined = [(i, rows, self.members[i].imagine(MemoryEnsemble._rows(states[i], rows), temperature,
                                                      generator)) for i, rows in self._worlds(batch)]
        z = MemoryEnsemble._merge([(rows, self.members[i].latent(s)) for i, rows, s in imagined], batch)
        out = [m.observe(s, z) for m, s in zip(self.members, states)]
        for i, rows, s in imagined:  # the world keeps its own imagined state on its rows
            out[i] = tuple(part.index_put((torch.arange(batch, device=part.device)[rows],), own)
                           for part, own in zip(out[i], s))
        return tuple(part for s in out for part in s)

    def member_rewards(self, state) -> torch.Tensor:
        """Every member's predicted reward on every row, float (K, B)."""
        return torch.stack([m.heads(s)[0] for m, s in zip(self.members, self._per_member(state))])

    def heads(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        """(Penalised reward, done logit), (B,) each: row b's world's reward minus lambda times the standard
        deviation of the K members' rewards (unbiased), and the world's done logit."""
        states = self._per_member(state)
        batch = len(states[0][0])
        world = MemoryEnsemble._merge([(rows, self.members[i].heads(MemoryEnsemble._rows(states[i], rows)))
                                       for i, rows in self._worlds(batch)], batch)
        reward, done_logit = world
        if self.penalty:
            reward = reward - self.penalty * self.member_rewards(state).std(dim=0)
        return reward, done_logit

    def latent(self, state) -> torch.Tensor:
        """The world's z (B, z_dim): after `imagine` every member holds it."""
        return self.members[0].latent(self._per_member(state)[0])
