"""`prx bench` of two checkouts side by side on this machine: the same config, alternating runs (A, B, A, B, ...)
so a machine that speeds up or slows down meanwhile affects both alike; prints each run and the ratio of medians.

    git worktree add /tmp/base <commit>
    python benchmarks/ab_bench.py --a src --b /tmp/base/src demo --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def bench(src: str, config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
        subprocess.run([sys.executable, "-m", "prx", "bench", config, *overrides, "--steps", str(steps), "--warmup",
                        str(warmup), "--json", out.name], env=env, check=True, capture_output=True, text=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a config both checkouts read (built-in name or path)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--a", required=True, help="the src/ directory of checkout A")
    parser.add_argument("--b", required=True, help="the src/ directory of checkout B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    seconds = {"A": [], "B": []}
    for r in range(args.rounds):
        for name, src in (("A", args.a), ("B", args.b)):
            result = bench(src, args.config, args.overrides, args.steps, args.warmup)
            seconds[name].append(result["step_seconds"])
            print(f"round {r + 1} {name} ({src}): {result['step_seconds']:.4f} s/step, {result['images_per_s']:.1f} "
                  f"images/s, {result['precision']}", flush=True)
    a, b = statistics.median(seconds["A"]), statistics.median(seconds["B"])
    print(f"median s/step: A {a:.4f}, B {b:.4f}; A/B step time {a / b:.3f} (below 1: A is faster)")


if __name__ == "__main__":
    main()
