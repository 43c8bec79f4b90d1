"""Constraints of config fields, declared beside the field they constrain::

    lr: float = positive(1e-4)
    caption_dropout: float = within(0.1, 0, 1, open_high=True)
    sampler: str = one_of("euler", "heun")

:func:`check_fields` tests them all and raises a one-line :class:`ConfigError` that names the key,
the rule and the value; a section's own ``check(run)`` method adds the rules that involve other
fields. Nothing here imports torch: config errors answer before any heavy import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from prx.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    text: str  # "must be positive"
    hint: str = ""  # what to do, e.g. ": a learning rate like 1e-4"


def _field(default: Any, rule: Rule) -> Any:
    return dataclasses.field(default=default, metadata={"rule": rule})


def positive(default: Any, hint: str = "") -> Any:
    return _field(default, Rule(lambda v: v > 0, "must be positive", hint))


def at_least(default: Any, low: float, hint: str = "") -> Any:
    return _field(default, Rule(lambda v: v >= low, f"must be ≥ {low:g}", hint))


def within(default: Any, low: float, high: float, *, open_low: bool = False, open_high: bool = False,
           hint: str = "") -> Any:
    def ok(v):
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    return _field(default, Rule(ok, f"must be in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}",
                                hint))


def one_of(*choices: str) -> Any:
    """The first choice is the default."""
    quoted = [f"'{c}'" for c in choices]
    text = f"{quoted[0]} or {quoted[1]}" if len(quoted) == 2 else f"one of {', '.join(quoted[:-1])} or {quoted[-1]}"
    return _field(choices[0], Rule(lambda v: v in choices, f"must be {text}"))


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_fields(section: Any, prefix: str) -> None:
    """Every declared rule of a config section (``None`` means "not set" and passes)."""
    for f in dataclasses.fields(section):
        rule = f.metadata.get("rule")
        value = getattr(section, f.name)
        if rule is not None and value is not None and not rule.ok(value):
            shown = f"'{value}'" if isinstance(value, str) else f"{value}"
            raise ConfigError(f"{prefix}.{f.name} {rule.text}, got {shown}{rule.hint}")


def block_index(index: int, num_layers: int) -> int:
    """A config's 0-based block index (negative counts from the end, -2 = the penultimate block) as
    a plain index; the one place block indices are normalised."""
    if not -num_layers <= index < num_layers:
        raise ConfigError(f"block {index} is outside a {num_layers}-block model (use 0..{num_layers - 1} or "
                          f"-{num_layers}..-1)")
    return index % num_layers
