"""An ensemble of M: K independently initialised members of one kind behind the M interface.

A C trained by CMA-ES in the dream of a single M finds the actions where that M is wrong in its favour (on
CarRacing-v3 here, a dream return of 450-770 for a C that scores 89 in the real env). Members fitted to the
same data from different initialisations agree where the data pins them and disagree elsewhere, so a C whose
dream episodes are spread over the members cannot exploit any one of them: Model-Ensemble TRPO (Kurutach,
Clavera, Duan, Tamar and Abbeel, ICLR 2018, section 4.2) samples one member per imagined rollout for this.

Here row b of every batched state is served by member b % K for the whole episode (states never move between
members), so a batch of population x rollouts spreads each candidate's rollouts over the members. Training
(`loss`) fits every member to the whole batch and averages their terms; the members differ by their
initialisation only. With batch 1 (a C driving the real env) member 0 serves.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MemoryEnsemble(nn.Module):
    """K Ms of one kind and config with the interface of models/__init__.py.

    Args:
        members: K >= 2 freshly built (or loaded) Ms of the same kind, config and sizes.

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

    def initial_state(self, batch: int):
        parts = [(rows, m.initial_state(len(range(batch)[rows]))) for m, rows in self._served(batch)]
        return self._merge(parts, batch)

    def observe(self, state, z: torch.Tensor, sample: bool = False, generator=None):
        return self._map(lambda m, s, z_rows: m.observe(s, z_rows, sample, generator), state, z)

    def features(self, state) -> torch.Tensor:
        return self._map(lambda m, s: m.features(s), state)

    def transition(self, state, a: torch.Tensor):
        return self._map(lambda m, s, a_rows: m.transition(s, a_rows), state, a)

    def imagine(self, state, temperature: float = 1.0, generator=None):
        return self._map(lambda m, s: m.imagine(s, temperature, generator), state)

    def heads(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        return self._map(lambda m, s: m.heads(s), state)

    def latent(self, state) -> torch.Tensor:
        return self._map(lambda m, s: m.latent(s), state)

    def loss(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Every member's loss on the whole batch; each term is the mean over members (so `loss` and `nll` read
        as one M's, and each member gets the gradient of its own loss / K)."""
        terms = [m.loss(*args, **kwargs) for m in self.members]
        return {name: torch.stack([t[name] for t in terms]).mean() for name in terms[0]}
