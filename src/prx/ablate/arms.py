"""The arms of an ablation: the recipe (``full``) and one arm per trick turned off, or a user's own
``name:key=value,key=value``. An arm is a list of config overrides on top of the ablation's config.

No torch here: parsing ``--arms`` needs only the names of the stand-in teachers.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from prx.errors import ConfigError
from prx.teacher_shapes import STAND_INS

# name → (overrides, what the arm changes). no-tread also drops self-guidance (it needs a routed pass):
# see arm_overrides.
BUILTIN_ARMS: dict[str, tuple[tuple[str, ...], str]] = {
    "full": ((), "the config as given: every trick it turns on"),
    "no-tread": (("tread.route_ratio=0",), ("no TREAD routing (every token through every block; samples guided "
                                            "by CFG where the config self-guides)")),
    "no-repa": (("repa.weight=0",), "no REPA alignment loss (nor its teacher's forward pass)"),
    "no-perceptual": (("perceptual.lpips_weight=0", "perceptual.dino_weight=0"),
                      "no LPIPS and no DINO perceptual loss (nor their networks' passes)"),
    "adamw": (("optimizer.name=adamw",), "AdamW for every parameter instead of Muon for the block matrices"),
    "no-ema": (("ema.decay=0",), "no weight average: measured on the raw weights"),
}
DEFAULT_ARMS = tuple(BUILTIN_ARMS)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]
    description: str
    builtin: bool = True


def split_top_level(text: str) -> list[str]:
    """'a,b=[1,2],c' → ['a', 'b=[1,2]', 'c']: commas inside brackets, braces or quotes do not split."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    parts.append(current.strip())
    return [p for p in parts if p]


def _unknown_arm(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(BUILTIN_ARMS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown arm '{name}'{hint}: the built-in arms are {', '.join(BUILTIN_ARMS)}; define your own "
                       f"as name:key=value,key=value (e.g. lr2x:optimizer.lr=2e-3)")


def parse_arms(texts: list[str] | str | None) -> list[Arm]:
    """``--arms`` values (each comma-separated; repeatable) → arms, ``full`` first (the table compares with it).

    An item with ``name:`` before its first ``=`` starts a user arm; items with ``=`` continue it;
    other items name built-in arms."""
    if texts is None:
        texts = [",".join(DEFAULT_ARMS)]
    texts = [texts] if isinstance(texts, str) else texts
    arms: list[Arm] = []
    for item in (p for text in texts for p in split_top_level(text)):
        head = item.split("=", 1)[0]
        if ":" in head:  # a user arm: name:key=value
            name, first = item.split(":", 1)
            name = name.strip()
            if not _NAME.match(name):
                raise ConfigError(f"arm name '{name}' in '{item}': use letters, digits and - _ . + (it names a "
                                  f"directory)")
            if name in BUILTIN_ARMS:
                raise ConfigError(f"arm name '{name}' is a built-in arm: give your arm another name")
            if "=" not in first:
                raise ConfigError(f"arm '{item}' is not name:key=value[,key=value] (e.g. lr2x:optimizer.lr=2e-3)")
            arms.append(Arm(name, (first.strip(),), "", builtin=False))
        elif "=" in item:  # another override of the user arm before it
            if not arms or arms[-1].builtin:
                raise ConfigError(f"'{item}' in --arms follows no user arm: write name:{item} (e.g. mine:{item})")
            last = arms[-1]
            arms[-1] = Arm(last.name, last.overrides + (item,), "", builtin=False)
        elif item in BUILTIN_ARMS:
            overrides, description = BUILTIN_ARMS[item]
            arms.append(Arm(item, overrides, description))
        else:
            raise _unknown_arm(item)
    arms = [a if a.builtin else Arm(a.name, a.overrides, ", ".join(a.overrides), False) for a in arms]
    names = [a.name for a in arms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"arm '{repeated[0]}' is given twice in --arms: give each arm once")
    if "full" not in names:  # every difference in the table is to full
        arms.insert(0, Arm("full", *BUILTIN_ARMS["full"]))
    return sorted(arms, key=lambda a: a.name != "full")


def arm_overrides(arm: Arm, base) -> list[str]:
    """The arm's overrides for a config ``base`` (the ablation's config without arm): without TREAD there is no
    routed pass, so self-guidance (``self``, ``both``) becomes classifier-free guidance."""
    out = list(arm.overrides)
    if arm.name == "no-tread":
        if base.sampling.guidance != "cfg":
            out.append("sampling.guidance=cfg")
        if base.eval.guidance not in (None, "cfg"):
            out.append("eval.guidance=cfg")
    return out


def parse_seeds(text: str) -> list[int]:
    """'0,1' → [0, 1]; one line for anything else."""
    try:
        seeds = [int(s) for s in split_top_level(text)]
    except ValueError:
        raise ConfigError(f"--seeds '{text}' is not a comma-separated list of integers (e.g. 0,1)") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds '{text}': give distinct integers ≥ 0, comma-separated (e.g. 0,1)")
    return seeds


def is_stand_in(name: str | None) -> bool:
    """A teacher with random weights (prx.teacher_shapes.STAND_INS, or a directory of one): it teaches nothing."""
    base = Path(str(name or "")).name
    return base in STAND_INS or base.startswith(("random-", "tiny-random-"))


def stand_in_tricks(cfg) -> set[str]:
    """The tricks on in some stage of ``cfg`` whose teacher is a random stand-in: repa, lpips, dino."""
    on = [cfg.tricks(stage) for stage in cfg.stages]
    p = cfg.perceptual
    found = set()
    if any(t.repa for t in on) and is_stand_in(cfg.repa.teacher):
        found.add("repa")
    if any(t.lpips for t in on) and is_stand_in(p.lpips_vgg_weights):
        found.add("lpips")
    if any(t.dino for t in on) and is_stand_in(p.dino_model):
        found.add("dino")
    return found
