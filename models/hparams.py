"""Hyperparameter fields: a default, its meaning, and the bounds it must respect, in one place.

Every model of this package keeps its hyperparameters in one small dataclass
beside it (nanoGPT's GPTConfig): `VAEConfig` in vae.py, `NVAEConfig` in nvae.py,
`MDNRNNConfig` in mdnrnn.py, `LinearControllerConfig` in controller.py. A
checkpoint stores `dataclasses.asdict(model.config)`; `config_from_dict` turns
it back into the dataclass, so the hyperparameters are listed once. The
experiment config (utils/config.py) builds its YAML sections on top of the same
dataclasses and reads each field's `help`, `choices` and bounds from the
metadata that `param` attaches.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from typing import Any


def param(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
          above: float | None = None, below: float | None = None) -> Any:
    """A dataclass field with its documentation and its bounds.

    Args:
        default: the default value (a dataclass instance becomes a default_factory).
        help: what the field means, with its unit.
        choices: the allowed values (for strings: usually a registry's keys).
        minimum: value >= minimum; above: value > above; below: value < below.
    """
    meta = {"help": help, "choices": choices, "minimum": minimum, "above": above, "below": below}
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_value(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with `value` for field `f` ("expected a value > 0, got 0"), or None when it fits."""
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"expected one of {tuple(meta['choices'])}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    if meta.get("minimum") is not None and not value >= meta["minimum"]:
        return f"expected a value >= {meta['minimum']:g}, got {value!r}"
    if meta.get("above") is not None and not value > meta["above"]:
        return f"expected a value > {meta['above']:g}, got {value!r}"
    if meta.get("below") is not None and not value < meta["below"]:
        return f"expected a value < {meta['below']:g}, got {value!r}"
    return None


def config_from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Rebuild dataclass `cls` (nested dataclasses included) from `dataclasses.asdict` output.

    Raises:
        ValueError: `data` is not a mapping, has a key `cls` does not know, or a value outside a field's
            choices or bounds (the message names `where` and the key).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown key {key!r} (expected one of: {', '.join(fields)})")
        if dataclasses.is_dataclass(hints[key]):
            value = config_from_dict(hints[key], value, f"{where}.{key}")
        else:
            problem = check_value(fields[key], value)
            if problem:
                raise ValueError(f"{where}.{key}: {problem}")
        kwargs[key] = value
    return cls(**kwargs)


def config_subset(cls: type, source: Any) -> Any:
    """An instance of dataclass `cls` whose fields are read, by name, from the object `source`
    (e.g. a YAML section that extends `cls` with training keys)."""
    return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})
