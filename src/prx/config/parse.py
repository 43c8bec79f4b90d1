"""Reading configs: YAML files (a built-in name or a path), dotted command-line overrides, and typed sections
built from plain dicts with errors that name the key. No heavy imports: a bad config answers at once."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from prx.config.model import MODEL_PRESETS, ModelConfig
from prx.config.rules import coerce, unknown_key
from prx.config.safe_yaml import MAX_BYTES, clip, load_yaml, short
from prx.errors import ConfigError


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """A config dataclass from a plain dict, every key and type checked (presets applied to ``model``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping of keys to values, got {short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise unknown_key(str(unknown[0]), prefix, list(fields))
    if cls is ModelConfig and data.get("preset") is not None:
        preset = data["preset"]
        if preset not in MODEL_PRESETS:
            close = difflib.get_close_matches(str(preset), list(MODEL_PRESETS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown model preset '{preset}'{hint}: choose one of {', '.join(MODEL_PRESETS)}"
            )
        data = {**MODEL_PRESETS[preset], **data}
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, value if value is not None else {}, f"{key}.")
        elif dataclasses.is_dataclass(inner) and isinstance(value, (list, tuple)):  # train.stages
            kwargs[name] = [v if isinstance(v, inner) else build_section(inner, v, f"{key}[{i}].")
                            for i, v in enumerate(value)]
        else:
            kwargs[name] = coerce(value, tp, key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{clip(text)}' is not of the form section.key=value (e.g. train.batch_size=32)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key; write section.key=value")
    try:
        value = load_yaml(raw, f"override '{clip(text)}'") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


_INDEXED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\[(\d+)\]$")


def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """A command line's ``[CONFIG] [key=value ...]``: the config (None: the command's default) and the overrides."""
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None and not overrides:
            config = item
        else:
            raise ConfigError(f"unexpected argument '{item}': give one CONFIG, then key=value overrides")
    return config, overrides


def apply_override(data: dict[str, Any], text: str) -> None:
    """Set ``section.key=value`` (or ``train.stages[1].steps=value``) in a plain config dict."""
    path, value = parse_override(text)
    node: Any = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        indexed = _INDEXED.match(part)
        key = indexed.group(1) if indexed else part
        if not isinstance(node, dict):
            raise ConfigError(f"override '{text}': '{'.'.join(path[:depth])}' is not a section")
        if indexed:
            items = node.get(key)
            index = int(indexed.group(2))
            if not isinstance(items, list) or index >= len(items):
                count = len(items) if isinstance(items, list) else 0
                raise ConfigError(f"override '{text}': {'.'.join(path[:depth] + [key])} has {count} entries, "
                                  f"so there is no [{index}]")
            if last:
                items[index] = value
            else:
                node = items[index]
        elif last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: pass an existing YAML file, or one of "
                          f"{', '.join(builtin_configs())}")
    if path.stat().st_size > MAX_BYTES:
        raise ConfigError(f"config file '{path}' is {path.stat().st_size / 2**20:.0f} MiB: a config is a few KiB of "
                          f"YAML; pass the right file")
    try:
        data = load_yaml(path.read_text(errors="replace"), f"config file '{path}'")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: fix the syntax there") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, data:, train:, ...)")
    return data


BUILTIN_CONFIG_DIR = Path(__file__).parent.parent / "configs"


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | None) -> Path:
    """A YAML path, or the name of a config shipped with prx (``demo``, ``speedrun``, ...)."""
    if name_or_path is None:
        return BUILTIN_CONFIG_DIR / "demo.yaml"
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix == "" and (BUILTIN_CONFIG_DIR / f"{name_or_path}.yaml").is_file():
        return BUILTIN_CONFIG_DIR / f"{name_or_path}.yaml"
    raise ConfigError(
        f"config '{name_or_path}' not found: pass a YAML file path or a built-in name ({', '.join(builtin_configs())})"
    )
