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
from typing import Any, Callable


def param(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
          maximum: float | None = None, above: float | None = None, below: float | None = None) -> Any:
    """A dataclass field with its documentation and its bounds.

    Args:
        default: the default value (a dataclass instance becomes a default_factory).
        help: what the field means, with its unit.
        choices: the allowed values (for strings: usually a registry's keys).
        minimum: value >= minimum; maximum: value <= maximum; above: value > above; below: value < below.
    """
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "above": above, "below": below}
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_value(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with `value` for field `f` ("expected a value > 0, got 0"), or None when it fits."""
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"expected one of {tuple(meta['choices'])}, got {value!r}"
    if value is None:  # an optional key left null (its type allows it): no bounds to check
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    if meta.get("minimum") is not None and not value >= meta["minimum"]:
        return f"expected a value >= {meta['minimum']:g}, got {value!r}"
    if meta.get("maximum") is not None and not value <= meta["maximum"]:
        return f"expected a value <= {meta['maximum']:g}, got {value!r}"
    if meta.get("above") is not None and not value > meta["above"]:
        return f"expected a value > {meta['above']:g}, got {value!r}"
    if meta.get("below") is not None and not value < meta["below"]:
        return f"expected a value < {meta['below']:g}, got {value!r}"
    return None


def config_from_dict(cls: type, data: Any, prefix: str = "", coerce: Callable | None = None,
                     renamed: dict[str, str] | None = None) -> Any:
    """Build dataclass `cls` (nested dataclasses included) from a plain mapping such as `dataclasses.asdict`
    output or a YAML section, checking every key and value.

    Args:
        prefix: the dotted path of `data` in the messages ("vision.").
        coerce: optional (value, annotation, dotted key) -> value, for readers whose values need converting
            (YAML's "1e-3" for a float); raises ValueError for a wrong type.
        renamed: {old dotted key: what replaced it}, to tell a user the new name.

    Raises:
        ValueError: "'<section>' must be a mapping", "key '<dotted>' was renamed to ...", "unknown key
            '<dotted>' (expected one of: ...)", or "key '<dotted>': <what was expected>".
    """
    if not isinstance(data, dict):
        raise ValueError(f"'{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if renamed and dotted in renamed:
            raise ValueError(f"key '{dotted}' was renamed to {renamed[dotted]}")
        if key not in fields:
            raise ValueError(f"unknown key '{dotted}' (expected one of: {', '.join(sorted(fields))})")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = config_from_dict(hints[key], value, f"{dotted}.", coerce, renamed)
            continue
        kwargs[key] = coerce(value, hints[key], dotted) if coerce else value
        problem = check_value(fields[key], kwargs[key])
        if problem:
            raise ValueError(f"key '{dotted}': {problem}")
    return cls(**kwargs)


def config_subset(cls: type, source: Any) -> Any:
    """An instance of dataclass `cls` whose fields are read, by name, from the object `source`
    (e.g. a YAML section that extends `cls` with training keys)."""
    return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})
