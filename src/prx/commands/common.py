"""What several commands share: the sampling options as a :class:`SamplingConfig`, and the prompts of a file."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from prx.config.sampling import SamplingConfig
from prx.errors import PrxError
from prx.sampling import check_request


def sampling_from_args(args: argparse.Namespace, base: SamplingConfig | None = None) -> SamplingConfig:
    """``base`` (default: the sampling defaults) with the sampling options given on the command line in place: the
    options are named after :class:`SamplingConfig`'s fields, so none is listed here."""
    given = {f.name: getattr(args, f.name, None) for f in fields(SamplingConfig)}
    return (base or SamplingConfig()).with_overrides(**given)


def check_sampling_args(args: argparse.Namespace, count: int, batch_size: int = 1) -> None:
    """The sampling options given on the command line, checked before the model loads (the run's own values are
    checked when they are used)."""
    check_request(count, sampling_from_args(args, SamplingConfig(steps=1, guidance_scale=1.0, self_guidance_scale=1.0)),
                  batch_size)


def read_prompts(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The prompts of ``--prompt`` (repeatable) or ``--prompts FILE``, with each one's number: its position, or in a
    file its line (0-based). Blank lines of a file are skipped but keep their numbers, so image NNNN.png is always
    line NNNN + 1 (and has that line's noise), and a note says which were skipped."""
    if not args.prompts:
        if not args.prompt:
            raise PrxError("no prompt given: use --prompt TEXT (repeatable) or --prompts FILE")
        return args.prompt, list(range(len(args.prompt)))
    path = Path(args.prompts)
    if not path.exists() or path.is_dir():
        raise PrxError(f"prompts file '{path}' does not exist: give a text file with one prompt per line")
    data = path.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrxError(f"prompts file '{path}' is not UTF-8 text (byte {e.start}: {e.reason}): give a text file "
                       f"with one prompt per line") from None
    lines = text.splitlines()
    numbers = [i for i, line in enumerate(lines) if line.strip()]
    if not numbers:
        raise PrxError(f"prompts file '{path}' has no prompts: write one prompt per line")
    blank = [i + 1 for i, line in enumerate(lines[: numbers[-1]]) if not line.strip()]
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (", …" if len(blank) > 10 else "")
        print(f"note: {len(blank)} blank line(s) of {path} skipped (line {shown}); images keep their line's number: "
              f"NNNN.png is line NNNN + 1", file=sys.stderr)
    return [lines[i].strip() for i in numbers], numbers
