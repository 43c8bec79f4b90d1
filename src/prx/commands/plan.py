"""``prx plan [CONFIG] [key=value ...] --gpu-memory SIZE``: a config's peak GPU memory per rank, and the settings
that fit (:mod:`prx.memory_plan`)."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict

from prx.config import apply_override, config_from_dict, load_config, read_yaml, resolve_config_path
from prx.config.parse import split_config_args
from prx.config.pretrained import REQUIRED, finetune_defaults
from prx.errors import PrxError

RELEASED_ID = "Photoroom/prxpixel-t2i"


def parse_size(text: str) -> int:
    """'24GiB' → bytes; '80GB' (10⁹ bytes each); a bare number is GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|G|MiB|MB|TiB|TB)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise PrxError(f"--gpu-memory '{text}' is not a size: write e.g. 24GiB, 80GB or 24 (GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "GiB").lower()
    scale = {"gib": 2**30, "g": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}[unit]
    if number <= 0:
        raise PrxError(f"--gpu-memory '{text}' must be positive")
    return int(number * scale)


def released_config(name: str | None, overrides: list[str]):
    """The config for planning a released shape: its training settings (a fine-tune's defaults where it sets
    ``model.init_from``), without reading the pipeline, which this machine need not have."""
    path = resolve_config_path(name or "finetune")
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    for text in overrides:
        apply_override(data, text)
    model = data.setdefault("model", {})
    if model.get("init_from") in (None, REQUIRED):
        model["init_from"] = RELEASED_ID
    return config_from_dict(finetune_defaults(data))


def run(args: argparse.Namespace) -> int:
    gpu_memory = parse_size(args.gpu_memory)
    if args.gpus < 1:
        raise PrxError(f"--gpus {args.gpus}: give at least 1")
    name, overrides = split_config_args(args.items)
    config = released_config(name, overrides) if args.model else load_config(name or "speedrun", overrides)
    from prx.memory_plan import plan_run  # torch and transformers load here, after the config is known to be good

    result = plan_run(config, gpu_memory, args.gpus, released=args.model)
    if args.json:
        print(json.dumps({**asdict(result.plan), "fits": result.plan.fits, "notes": result.notes}, indent=1))
    else:
        print(result.describe())
    return 0 if result.plan.fits else 1
