"""prx ablate: arms, budgets, the report's maths, and the whole command on toy runs."""

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prx.ablate.arms import parse_arms, parse_seeds, split_top_level
from prx.ablate.budget import Budget, budget_overrides, parse_budget, parse_flops, split_steps, stage_step_flops
from prx.ablate.report import cell
from prx.ablate.stats import METRICS, compare, summarize
from prx.cli import main
from prx.errors import ConfigError

# ------------------------------------------------------------------------------------------------
# The report's maths
# ------------------------------------------------------------------------------------------------


def test_mean_and_spread_over_seeds():
    s = summarize([1.0, 3.0])
    assert s.mean == 2.0 and s.n == 2 and s.spread == pytest.approx(math.sqrt(2))  # sample std (n − 1)
    assert summarize([5.0]).spread is None  # one seed: no spread
    assert summarize([None, float("nan"), 4.0]) == summarize([4.0])  # missing values left out
    assert summarize([]).mean is None


def test_beyond_the_seed_spread_means_the_intervals_do_not_touch():
    full = summarize([1.0, 1.2])  # 1.1 ± 0.141
    far, near = summarize([1.6, 1.8]), summarize([1.3, 1.5])  # 1.7 ± 0.141; 1.4 ± 0.141
    assert compare(far, full) == (pytest.approx(0.6), True)  # 0.6 > 0.283
    assert compare(near, full) == (pytest.approx(0.3), True)  # 0.3 > 0.283, just
    assert compare(summarize([1.2, 1.4]), full) == (pytest.approx(0.2), False)
    assert compare(summarize([9.0]), full) == (pytest.approx(7.9), None)  # one seed: no verdict
    assert compare(summarize([]), full) == (None, None)


def test_a_judge_rate_has_a_binomial_floor_under_its_spread():
    from prx.ablate.stats import with_rate_floor

    zero, two = with_rate_floor(summarize([0.0, 0.0]), 60), with_rate_floor(summarize([1 / 60, 2 / 60]), 60)
    assert zero.spread == pytest.approx(math.sqrt((1 / 60) * (59 / 60) / 60))  # 0 of 60, twice: still ±1.7 points
    assert compare(two, zero)[1] is False  # 1.5 of 60 against 0 of 60 is not a finding
    assert compare(with_rate_floor(summarize([0.5, 0.52]), 60), zero)[1] is True


def test_a_cell_shows_the_difference_the_flag_and_the_ratio_of_costs():
    loss, steps = METRICS[0], next(m for m in METRICS if m.key == "steps")
    stats = {"mean": 0.5, "spread": 0.01, "n": 2, "diff": -0.1, "beyond": True, "ratio": 0.8}
    assert cell(loss, stats, is_full=False, compared=True) == "0.5000 ± 0.0100 (-0.1000✱)"
    assert cell(loss, stats, is_full=True, compared=True) == "0.5000 ± 0.0100"
    assert cell(loss, stats, is_full=False, compared=False) == "0.5000 ± 0.0100 †"
    assert cell(steps, {**stats, "mean": 1200, "spread": 0.0}, is_full=False, compared=True) == "1200 ± 0 (×0.80)"
    assert cell(loss, {**stats, "n": 0}, is_full=False, compared=True) == "—"


def test_without_matplotlib_the_plots_are_skipped_with_a_note(tmp_path, monkeypatch):
    from prx.ablate.plots import write_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails, as where it is not installed
    files, note = write_plots(tmp_path, [], {})
    assert files == [] and "plots skipped: matplotlib is not installed" in note


# ------------------------------------------------------------------------------------------------
# Arms, seeds, budgets
# ------------------------------------------------------------------------------------------------


def test_arms_builtin_and_user_defined():
    assert [a.name for a in parse_arms(None)] == ["full", "no-tread", "no-repa", "no-perceptual", "adamw", "no-ema"]
    arms = parse_arms(["no-ema,big:model.hidden_dim=128,model.num_heads=2", "gi:sampling.guidance_interval=[0.1,0.9]"])
    assert [a.name for a in arms] == ["full", "no-ema", "big", "gi"]  # full added, first: the table compares with it
    assert arms[2].overrides == ("model.hidden_dim=128", "model.num_heads=2")
    assert arms[3].overrides == ("sampling.guidance_interval=[0.1,0.9]",)
    assert split_top_level("a,b={x: [1, 2]},c") == ["a", "b={x: [1, 2]}", "c"]
    assert parse_seeds("0, 1,2") == [0, 1, 2]


@pytest.mark.parametrize("text, error", [
    ("full,no-treed", "unknown arm 'no-treed' (did you mean 'no-tread'?)"),
    ("lr:optimizer.lr", "is not name:key=value"),
    ("optimizer.lr=1", "follows no user arm"),
    ("full:optimizer.lr=1", "is a built-in arm"),
    ("a b:optimizer.lr=1", "use letters, digits"),
    ("no-ema,no-ema", "given twice"),
])
def test_bad_arms_are_one_line_errors(text, error):
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_arms([text])


def test_budgets_parse_and_exclude_each_other():
    assert parse_flops("2.5P") == 2.5e15 and parse_flops("300TFLOP") == 3e14 and parse_flops("4e9") == 4e9
    assert parse_budget(None, None, None) == Budget("config")
    assert parse_budget(None, "1G", None) == Budget("flops", 1e9)
    with pytest.raises(ConfigError, match="give one budget, not --budget-steps and --budget-minutes"):
        parse_budget(5, None, 3.0)
    with pytest.raises(ConfigError, match="must be a positive number"):
        parse_budget(0, None, None)
    for bad in ("abc", "1X"):
        with pytest.raises(ConfigError, match="is not a FLOP count"):
            parse_flops(bad)


def test_equal_flops_buy_cheaper_arms_more_steps_in_the_stages_proportions():
    from prx.config import load_config

    no_tread = ["tread.route_ratio=0", "sampling.guidance=cfg"]
    full, dense = load_config("speedrun-tiny"), load_config("speedrun-tiny", no_tread)
    assert split_steps(full, 100) == [60, 40]  # the config's 6 : 4
    budget = Budget("flops", 1e13)
    steps = {}
    for name, cfg in (("full", full), ("dense", dense)):
        overrides = budget_overrides(cfg, budget)
        assert "train.time_budget_minutes=0" in overrides and "train.time_limit_minutes=0" in overrides
        trained = load_config("speedrun-tiny", no_tread * (name == "dense") + overrides)
        spent = sum(s.steps * f for s, f in zip(trained.stages, stage_step_flops(trained)))
        assert spent <= budget.value * 1.001 and spent > budget.value - 2 * max(stage_step_flops(trained))
        steps[name] = trained.total_steps
    assert steps["full"] > steps["dense"]  # TREAD's routed blocks are cheaper: the same FLOPs buy more steps
    with pytest.raises(ConfigError, match="needs a single-stage config"):
        budget_overrides(full, Budget("minutes", 10))
    timed = budget_overrides(load_config("tiny"), Budget("minutes", 3))  # the trainer's own time budget sets the steps
    assert "train.time_budget_minutes=3" in timed and "train.time_limit_minutes=4.5" in timed


def test_dry_run_prints_each_arms_plan_and_writes_nothing(tmp_path, capsys):
    assert main(["ablate", "speedrun", "--out", str(tmp_path / "abl"), "--budget-flops", "1e19", "--seeds", "0",
                 "--arms", "no-tread", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    steps = {line.split()[0]: int(line.split()[1]) for line in printed.splitlines() if line.strip().endswith("FLOP")}
    assert steps["full-s0"] > steps["no-tread-s0"] > 0  # at the recipe's size TREAD's cheaper steps buy 36% more
    assert "tread.route_ratio=0" in printed and not (tmp_path / "abl").exists()


def test_arms_with_a_stand_in_teacher_are_not_compared(tmp_path):
    from prx.ablate.report import collect
    from prx.ablate.runner import build_run
    from prx.ablate.runs import Settings
    from prx.config import load_config

    settings = Settings("speedrun-tiny", tmp_path, parse_arms(["no-repa,no-ema,no-tread"]), [0], Budget("steps", 10))
    base = load_config("speedrun-tiny")
    runs = [build_run(settings, base, arm, 0, [str(tmp_path / "heldout")], []) for arm in settings.arms]
    assert runs[0].stand_ins == {"repa", "lpips", "dino"}  # speedrun-tiny's teachers are all tiny random ones
    compared = {a["arm"].name: a["compared"] for a in collect(runs)}
    assert compared == {"full": True, "no-repa": False, "no-ema": True, "no-tread": True}
    no_tread = runs[3].config
    assert no_tread.tread.route_ratio == 0 and no_tread.sampling.guidance == "cfg"  # self-guidance needs a route
    assert runs[2].config.ema.decay == 0 and runs[2].config.train.seed == 0 and runs[2].config.total_steps == 10


def test_time_left_from_the_same_arms_other_seed_else_the_pace_per_flop():
    from types import SimpleNamespace

    from prx.ablate.runner import Progress

    def run(arm, seed, flops):
        return SimpleNamespace(key=f"{arm}-s{seed}", arm=SimpleNamespace(name=arm), planned_flops=flops)

    runs = [run("full", 0, 10.0), run("cheap", 0, 10.0), run("full", 1, 10.0), run("cheap", 1, 10.0)]
    progress, lines = Progress(runs, Budget("flops", 10.0), log=lambda text, **_: lines.append(text)), []
    assert progress.time_left() == "4 arm run(s) left, time unknown until one finishes"
    progress.done(runs[0], {"steps": 5, "val_loss": 1.0}, 100.0)
    assert progress.time_left() == "3 arm run(s) left, about 5m00s"  # 100 s per 10 FLOPs, three times
    progress.done(runs[1], {"steps": 50, "val_loss": 1.0}, 400.0)
    assert progress.time_left() == "2 arm run(s) left, about 8m20s"  # full-s1 as full-s0, cheap-s1 as cheap-s0
    assert lines[-1].startswith("[ablate 2/4] cheap-s0: done in 6m40s: 50 steps, val loss 1.0000")


def test_parallel_arms_deal_an_arms_seeds_to_different_ranks():
    from prx.ablate.runner import share

    runs = [f"{arm}-s{seed}" for seed in (0, 1) for arm in ("full", "no-tread", "no-perceptual")]  # seed-major
    assert share(runs, 3, 0, 2) == ["full-s0", "no-tread-s0", "no-perceptual-s0"]
    assert share(runs, 3, 1, 2) == ["full-s1", "no-tread-s1", "no-perceptual-s1"]
    assert sorted(share(runs, 3, 0, 4) + share(runs, 3, 1, 4) + share(runs, 3, 2, 4) + share(runs, 3, 3, 4)) == sorted(runs)


# ------------------------------------------------------------------------------------------------
# The command, end to end
# ------------------------------------------------------------------------------------------------

# toy size: the tiny config with TREAD and Muon on (so the arms differ), 3 evaluations per arm, 8 held-out samples,
# 2 prompts per judge set, CMMD and CLIP score from a random stand-in CLIP (the image-metric path, offline)
TOY = ["tiny", "tread.route_ratio=0.5", "optimizer.name=muon", "eval.clip_model=tiny-random-clip",
       "train.num_threads=1"]
ARGS = ["--arms", "full,no-tread,adamw", "--budget-steps", "6", "--seeds", "0", "--points", "2", "--eval-samples", "8",
        "--judge-prompts", "2"]


def ablate(out: Path, *extra: str) -> int:
    return main(["ablate", *TOY, "--out", str(out), *ARGS, *extra])


def snapshot(out: Path) -> dict:
    """Every file under the arms' directories, by path: size and modification time."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in (out / "arms").rglob("*")
            if p.is_file()}


@pytest.mark.slow
def test_ablate_writes_the_report_and_a_second_call_trains_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"
    assert ablate(out) == 0
    for name in ("results.md", "results.csv", "results.json"):
        assert (out / name).is_file()
    assert list(out.glob("*.png")), "no plot written"
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    data = json.loads((out / "results.json").read_text())
    assert [a["name"] for a in data["arms"]] == ["full", "no-tread", "adamw"]
    full = data["arms"][0]["runs"][0]["result"]
    assert full["steps"] == 6 and full["val_loss"] > 0 and "judge/single_held_in" in full and "cmmd" in full
    assert "random stand-in" in data["metric_notes"]["cmmd"] and "skipped" in data["metric_notes"]["fid"]
    curve = data["arms"][0]["runs"][0]["curve"]
    assert [p["step"] for p in curve] == [3, 6] and curve[0]["flops"] < curve[1]["flops"]
    table = (out / "results.md").read_text()
    assert "equal steps (6 optimizer steps per arm)" in table and "| val loss, held-out (all t) ↓ |" in table
    assert (out / "arms" / "no-tread-s0" / "checkpoints" / "latest").exists()  # an ordinary run directory

    # the same command again: every arm is finished, nothing trains, nothing under arms/ changes
    before = snapshot(out)
    capsys.readouterr()
    trainer_init = __import__("prx.train", fromlist=["Trainer"]).Trainer.__init__

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr("prx.train.Trainer.__init__", no_training)
    started = time.monotonic()
    assert ablate(out) == 0
    assert time.monotonic() - started < 30, "the second call should take seconds: configs, the report, the plots"
    assert snapshot(out) == before  # no new step, checkpoint, log line or evaluation
    assert capsys.readouterr().out.count("finished before: skipped") == 3
    # an arm recorded by an older prx, whose config had no lora: section, is the same arm (it ran with the default)
    record = out / "arms" / "full-s0" / "ablate.json"
    state = json.loads(record.read_text())
    assert any(k.startswith("lora.") for k in state["config"])
    state["config"] = {k: v for k, v in state["config"].items() if not k.startswith("lora.")}
    record.write_text(json.dumps({**state, "fingerprint": "from-an-older-prx"}))
    (out / "results.md").unlink()
    assert ablate(out, "--report-only") == 0
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("|")]
    assert rows == [line for line in table.splitlines() if line.startswith("|")]

    # an arm interrupted after its step 6 but before that checkpoint: the same command resumes it from step 3
    monkeypatch.setattr("prx.train.Trainer.__init__", trainer_init)
    run = out / "arms" / "adamw-s0"
    (run / "ablate.json").write_text(json.dumps({**json.loads((run / "ablate.json").read_text()), "result": None}))
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    capsys.readouterr()
    assert ablate(out) == 0
    printed = capsys.readouterr().out
    assert "adamw-s0: resuming" in printed and "at step 3" in printed, printed
    assert printed.count("finished before: skipped") == 2
    assert json.loads((run / "ablate.json").read_text())["result"]["steps"] == 6

    # another budget into the same directory: refused in one line, naming what changed
    assert main(["ablate", *TOY, "--out", str(out), *ARGS[:3], "7", *ARGS[4:]]) == 2
    assert "was run with another config (train.steps: 6 → 7" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["one arm on both ranks", "--parallel-arms"])
def test_ablate_under_torchrun_with_two_gloo_ranks(tmp_path, mode):
    out = tmp_path / "abl"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    parallel = mode == "--parallel-arms"
    arms = ["--arms", "full,no-tread", "--parallel-arms"] if parallel else ["--arms", "full"]
    result = subprocess.run([*torchrun, "-m", "prx.cli", "ablate", *TOY, "--out", str(out), *arms, "--budget-steps", "4",
                             "--seeds", "0", "--points", "1", "--eval-samples", "4", "--judge-prompts", "1",
                             "--no-image-metrics"], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if parallel:  # each rank trained one arm alone
        assert "[ablate rank 0 1/1] full-s0" in result.stdout and "[ablate rank 1 1/1] no-tread-s0" in result.stdout
    else:  # both ranks trained the arm together
        assert "cpu × 2 (" in result.stdout  # the execution plan: one process group of 2 ranks (ddp or fsdp2)
    data = json.loads((out / "results.json").read_text())
    results = [run["result"] for arm in data["arms"] for run in arm["runs"]]
    assert [r["steps"] for r in results] == [4] * len(results) and all(r["val_loss"] > 0 for r in results)
    assert "judge/single_held_in" in results[0]
