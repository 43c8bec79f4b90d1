"""Docs that cannot rot: the README's quickstart and every shell block of docs/ marked ```` ```bash runnable ````
run here at toy size (docs/README.md says how), the configuration reference is what
scripts/config_reference.py writes from the dataclasses, and every relative link lands."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from photos import write_photo_folder

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*PAGES, ROOT / "benchmarks" / "RESULTS.md"]  # pages whose links and headings are checked
FENCE = re.compile(r"^```bash runnable[^\n]*\n(.*?)^```\s*$", re.S | re.M)

# What the toy `prx` on the blocks' PATH adds to each command, before the command's own options (so an
# option the block gives wins): a few steps of the same config, nothing compiled, no worker processes.
TOY = {
    "train": ["train.time_budget_minutes=0", "train.time_limit_minutes=0", "train.steps=2", "train.batch_size=4",
              "train.compile=off", "data.num_workers=0", "logging.progress_bar=false", "logging.sample_every=0",
              "logging.tensorboard=false"],
    "sample": ["--steps", "2"],
    "eval": ["--steps", "2"],
    "bench": ["--steps", "1", "--warmup", "0"],
}
# Commands the docs already describe but prx does not have yet: a block runs up to the first such line and the
# test is an expected failure that names the feature, until the feature exists.
PENDING: dict[str, tuple[str, object]] = {}  # regex of the line → (the feature, a check that it exists now)

WRAPPER = '''\
import sys

from prx.cli import main

TOY = {toy!r}
args = sys.argv[1:]
if args and args[0] in TOY:
    at = 1
    if args[0] == "train" and len(args) > 1 and not args[1].startswith("-") and "=" not in args[1]:
        at = 2  # after CONFIG: the toy overrides come before the block's own
    args[at:at] = TOY[args[0]]
sys.exit(main(args))
'''


def runnable_blocks() -> list[tuple[str, str]]:
    """(page:line, the block's text) of every ```bash runnable block in README.md and docs/."""
    blocks = []
    for page in PAGES:
        # a block shown inside a four-backtick fence is an example of the syntax, not a block to run
        text = re.sub(r"^````.*?^````", lambda m: "\n" * m.group(0).count("\n"), page.read_text(), flags=re.S | re.M)
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return blocks


def toy_environment(tmp_path: Path) -> dict[str, str]:
    """PATH with the toy `prx` and this interpreter as `python`; this checkout's prx first; no network."""
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    prx = bin_dir / "prx"
    prx.write_text(f"#!{sys.executable}\n" + WRAPPER.format(toy=TOY))
    prx.chmod(0o755)
    python = bin_dir / "python"  # a script, not a symlink: a venv's python finds its venv by its own path
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])  # torchrun too
    env = {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TQDM_DISABLE": "1"}
    return env


@pytest.mark.slow
@pytest.mark.parametrize("where,block", runnable_blocks(), ids=[w for w, _ in runnable_blocks()])
def test_runnable_blocks_do_what_they_say(where, block, tmp_path):
    work = tmp_path / "work"
    write_photo_folder(work / "photos")  # the quickstart's folder of captioned photos
    lines = block.splitlines()
    missing = None
    for i, line in enumerate(lines):
        pending = next(((what, ready) for pattern, (what, ready) in PENDING.items() if re.search(pattern, line)), None)
        if pending and not pending[1]():
            lines, missing = lines[:i], pending[0]
            break
    script = "\n".join(lines) + "\n"
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=toy_environment(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (f"{where}: the block failed (exit {done.returncode})\n--- block run:\n{script}"
                                  f"--- output (last 3000 characters):\n{(done.stdout + done.stderr)[-3000:]}")
    if missing:
        pytest.xfail(f"{where}: ran up to the line that needs {missing}")


def test_the_docs_have_runnable_blocks_and_the_readme_is_a_front_door():
    where = [w for w, _ in runnable_blocks()]
    assert any(w.startswith("README.md") for w in where) and any(w.startswith("docs/") for w in where)
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 300, f"README.md has {len(readme)} lines: keep it a front door (≤ 300), move detail to docs/"
    long = [i + 1 for i, line in enumerate(readme) if len(line) > 200]
    assert not long, f"README.md lines over 200 characters: {long}"
    quickstart = next(b for w, b in runnable_blocks() if w.startswith("README.md"))
    assert len(quickstart.splitlines()) <= 25


def test_the_configuration_reference_is_current():
    generated = runpy.run_path(str(ROOT / "scripts" / "config_reference.py"))["reference"]()
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == generated, ("docs/configuration.md is stale: run `python scripts/config_reference.py > "
                               "docs/configuration.md` and commit it")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_every_relative_link_and_anchor_lands():
    anchors = {}
    for page in LINKED:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        anchors[page] = {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    broken = []
    for page in LINKED:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors.get(dest, set()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + textwrap.indent("\n".join(broken), "  ")
