"""Constraints of config fields, declared beside the field they constrain::

    lr: float = positive(1e-4)
    caption_dropout: float = within(0.1, 0, 1, open_high=True)
    sampler: str = one_of("euler", "heun")

:func:`check_fields` tests them all and raises a one-line :class:`ConfigError` that names the key,
the rule and the value; a section's own ``check(run)`` method adds the rules that involve other
fields. :func:`coerce` checks a YAML value against its field's annotation. Nothing here imports
torch: config errors answer before any heavy import.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from prx.config.safe_yaml import clip, short
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

    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return _field(default, Rule(ok, f"must be in {interval}", hint))


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
            shown = short(value)
            raise ConfigError(f"{prefix}.{f.name} {rule.text}, got {shown}{rule.hint}")


def block_index(index: int, num_layers: int) -> int:
    """A config's 0-based block index (negative counts from the end, -2 = the penultimate block) as
    a plain index; the one place block indices are normalised."""
    if not -num_layers <= index < num_layers:
        raise ConfigError(f"block {index} is outside a {num_layers}-block model (use 0..{num_layers - 1} or "
                          f"-{num_layers}..-1)")
    return index % num_layers


# --------------------------------------------------------------------------------------------
# Types: a YAML value against its field's annotation
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with the few safe conversions YAML needs)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {short(value)}")
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        raise ConfigError(f"{key} must be null, got {short(value)}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {short(value)} (write it as [a, b, ...])")
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {short(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {short(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted on/off (train.compile=off) as a boolean
            return "on" if value else "off"
        if isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {short(value)}")
    raise TypeError(f"unsupported annotation {tp} for {key}")


def unknown_key(key: str, prefix: str, known: list[str]) -> ConfigError:
    key = clip(key, 60) if isinstance(key, str) else short(key, 60)
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
    return ConfigError(f"unknown config key '{full}': {hint}")
