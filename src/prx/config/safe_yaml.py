"""YAML a user hands prx (config files, ``key=value`` overrides, the config inside a checkpoint or an export), read
so that a mistake is one line and a hostile file costs nothing: a key given twice in one mapping is an error naming
it and both lines (YAML would silently keep the second), aliases may not expand a document past :data:`MAX_VALUES`
values (a "billion laughs" bomb is refused before it is built), and error messages show values through
:func:`short`, a bounded repr."""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

from prx.errors import ConfigError

MAX_VALUES = 100_000  # the scalars, lists and mappings a document may expand to through its aliases
MAX_BYTES = 16 * 2**20  # a config file larger than this is not a config
_MERGE = "tag:yaml.org,2002:merge"

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def short(value: Any, limit: int = 80) -> str:
    """A repr of ``value`` for an error message: at most ``limit`` characters, in time bounded whatever its size."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to at most ``limit`` characters (for names and overrides quoted in a message)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_yaml(text: str, where: str) -> Any:
    """The document in ``text`` (``where`` names it in errors: "config file 'x.yaml'"), checked before it is built:
    no key twice in a mapping, no alias that expands it past :data:`MAX_VALUES` values or refers to itself.
    Raises :class:`ConfigError`, or ``yaml.YAMLError`` for a syntax error (with its line)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _Inspection(where).size(node, "")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where} nests too deeply to be a config") from None
    finally:
        loader.dispose()


class _Inspection:
    """One walk over a composed document: each node once (aliases share nodes), with its expanded size."""

    def __init__(self, where: str):
        self.where = where
        self.sizes: dict[int, int] = {}
        self.active: set[int] = set()

    def size(self, node: yaml.Node, path: str) -> int:
        key = id(node)
        if key in self.sizes:
            return self.sizes[key]
        if key in self.active:
            raise ConfigError(f"{self.where}: an alias at or under '{path or 'the top'}' (line "
                              f"{node.start_mark.line + 1}) refers to a value that contains it")
        self.active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for k, v in node.value:
                name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE:
                    line = k.start_mark.line + 1
                    if (k.tag, k.value) in lines:
                        dotted = f"{path}.{name}" if path else name
                        raise ConfigError(f"{self.where}: key '{clip(dotted, 120)}' appears twice, at line "
                                          f"{lines[(k.tag, k.value)]} and line {line}: a mapping takes each key once "
                                          f"(the second would replace the first entirely); merge them")
                    lines[(k.tag, k.value)] = line
                total += self.size(k, path) + self.size(v, f"{path}.{name}" if path else str(name))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                total += self.size(v, f"{path}[{i}]")
        self.active.discard(key)
        if total > MAX_VALUES:
            raise ConfigError(f"{self.where}: '{clip(path or 'the document', 120)}' (line {node.start_mark.line + 1}) "
                              f"expands to more than {MAX_VALUES} values through YAML aliases (&name / *name): no "
                              f"config is that large; write the values out")
        self.sizes[key] = total
        return total
