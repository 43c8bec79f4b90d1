"""The ablation's report: ``OUT/results.md`` (one table, arms × metrics), ``results.csv``, ``results.json``,
and the plots (:mod:`prx.ablate.plots`).

Every number is a mean over seeds ± its spread, the standard deviation over seeds (n − 1). An arm's
difference to ``full`` is *beyond the seed spread* (✱) when |Δ| > spread(arm) + spread(full): the two
intervals mean ± spread do not touch. With one seed there is no spread and no verdict. An arm that
differs from ``full`` in a trick whose teacher is a random stand-in is shown but not compared.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from prx.ablate.measure import judge_sets
from prx.ablate.plots import write_plots
from prx.ablate.runs import ArmRun, Settings, environment, read_state
from prx.ablate.stats import BEYOND, METRICS, NOT_COMPARED, Metric, compare, summarize, with_rate_floor

# --------------------------------------------------------------------------------------------
# Collecting the arms' results
# --------------------------------------------------------------------------------------------


def collect(runs: list[ArmRun]) -> list[dict]:
    """One entry per arm (in the command's order): its runs' states, whether it is compared with full, and why not."""
    states = {run.key: read_state(run) for run in runs}
    full = {run.seed: run for run in runs if run.arm.name == "full"}
    arms: dict[str, dict] = {}
    for run in runs:
        entry = arms.setdefault(run.arm.name, {"arm": run.arm, "runs": [], "stand_ins": sorted(run.stand_ins),
                                               "notes": []})
        entry["runs"].append((run, states[run.key]))
        reference = full[run.seed]
        differ = set(run.stand_ins) ^ set(reference.stand_ins)
        entry["compared"] = not differ
        if differ and not entry["notes"]:
            names = " and ".join(t.upper() for t in sorted(differ))
            are = "teachers are random stand-ins" if len(differ) > 1 else "teacher is a random stand-in"
            entry["notes"].append(f"not compared: its {names} {are} (teaching nothing), so the difference says "
                                  f"nothing about the trick")
        if run.arm.name != "full" and _same_training(run, reference) and not any("same" in n for n in entry["notes"]):
            entry["notes"].append("the same training as full: the trick is off in this config already")
    return list(arms.values())


def _same_training(run: ArmRun, full: ArmRun) -> bool:
    seedless = ("train.seed", "data.shapes.seed")
    return ({k: v for k, v in run.requested.items() if k not in seedless}
            == {k: v for k, v in full.requested.items() if k not in seedless})


def value_of(state: dict | None, key: str) -> float | None:
    return ((state or {}).get("result") or {}).get(key)


def summaries(arms: list[dict], prompts: dict[str, int] | None = None) -> dict[str, dict[str, dict]]:
    """arm → metric → {mean, spread, n, values, diff, beyond, ratio}: the table's numbers. ``prompts``: the judge's
    prompts per set (its rates' spreads have a binomial floor)."""
    full = next(a for a in arms if a["arm"].name == "full")
    out: dict[str, dict[str, dict]] = {}
    for entry in arms:
        out[entry["arm"].name] = {}
        for metric in METRICS:
            values = [value_of(state, metric.key) for _, state in entry["runs"]]
            s = summarize(values)
            base = summarize([value_of(state, metric.key) for _, state in full["runs"]])
            if (count := (prompts or {}).get(metric.key.removeprefix("judge/"))) and metric.key.startswith("judge/"):
                s, base = with_rate_floor(s, count), with_rate_floor(base, count)
            diff, beyond = compare(s, base) if entry is not full else (None, None)
            out[entry["arm"].name][metric.key] = {
                "mean": s.mean, "spread": s.spread, "n": s.n, "values": values, "diff": diff,
                "beyond": beyond if entry["compared"] else None,
                "ratio": s.mean / base.mean if s.mean is not None and base.mean else None}
    return out


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def signed(metric: Metric, value: float) -> str:
    return metric.fmt.replace("{:", "{:+").format(value)


def cell(metric: Metric, stats: dict, is_full: bool, compared: bool) -> str:
    """'mean ± spread', then (Δ to full, ✱ beyond the spread) for a result, (×ratio) for a cost, † if not compared."""
    if not stats["n"]:
        return "—"
    spread = stats["spread"]
    shown = "" if spread is None else " ± 0" if spread == 0 else f" ± {metric.format(spread)}"
    text = metric.format(stats["mean"]) + shown
    if is_full:
        return text
    if metric.better is None:
        return text + (f" (×{stats['ratio']:.2f})" if stats["ratio"] is not None else "")
    if not compared:
        return f"{text} {NOT_COMPARED}"
    if stats["diff"] is None:
        return text
    return f"{text} ({signed(metric, stats['diff'])}{BEYOND if stats['beyond'] else ''})"


def table(arms: list[dict], numbers: dict) -> list[str]:
    names = [a["arm"].name for a in arms]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric in METRICS:
        if not any(numbers[n][metric.key]["n"] for n in names):
            continue
        arrow = {"lower": " ↓", "higher": " ↑"}.get(metric.better, "")
        cells = [cell(metric, numbers[a["arm"].name][metric.key], a["arm"].name == "full", a["compared"]) for a in arms]
        lines.append(f"| {metric.label}{arrow} | " + " | ".join(cells) + " |")
    return lines


def arm_lines(arms: list[dict]) -> list[str]:
    lines = []
    for a in arms:
        arm = a["arm"]
        done = sum(1 for _, state in a["runs"] if value_of(state, "steps") is not None)
        overrides = f" (`{' '.join(arm.overrides)}`)" if arm.overrides else ""
        notes = "".join(f" {NOT_COMPARED + ' ' if n.startswith('not compared') else ''}{n}." for n in a["notes"])
        runs = len(a["runs"])
        pending = f" {runs - done} of {runs} seed run(s) not finished yet." if done < runs else ""
        lines.append(f"- **{arm.name}**{overrides}: {arm.description}.{notes}{pending}")
    return lines


def markdown(settings: Settings, arms: list[dict], numbers: dict, env: dict, notes: dict, plots: list[str]) -> str:
    seeds = ", ".join(str(s) for s in settings.seeds)
    legend = (f"**Comparison: {settings.budget.describe()}.** Seeds {seeds}: mean ± spread (the standard deviation "
              f"over seeds). In brackets the difference to `full` ({BEYOND}: beyond the seed spread, "
              f"|Δ| > spread(arm) + spread(full); a judge rate's spread is at least one seed's binomial standard "
              f"error); for costs the ratio to `full`; ↓/↑: lower/higher is better; "
              f"{NOT_COMPARED}: not compared (see the arm). Measured on the EMA weights of each arm's last checkpoint.")
    lines = [f"# Ablation of `{settings.config}`", "", legend, ""]
    lines += table(arms, numbers) + ["", "Arms:"] + arm_lines(arms)
    if notes:
        lines += ["", "Image metrics:"] + [f"- {k}: {v}" for k, v in notes.items()]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in plots)]
    trained = sorted({f"prx {e['commit']} on {e['hardware']}, {e['date']}" for a in arms for _, state in a["runs"]
                      if (e := (state or {}).get("trained_with"))})
    lines += ["", f"Command: `{settings.command}`", "", f"Report written {env['date']} (prx {env['commit']}, torch "
              f"{env['torch']}); arms trained with " + ("; ".join(trained) or "—") + "."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_csv(path: Path, arms: list[dict], numbers: dict) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["arm", "metric", "n_seeds", "mean", "spread", "diff_vs_full", "ratio_vs_full", "beyond_spread",
                      "compared", "values_by_seed"])
        for a in arms:
            seeds = [run.seed for run, _ in a["runs"]]
            for metric in METRICS:
                s = numbers[a["arm"].name][metric.key]
                if s["n"]:
                    values = ";".join(f"{seed}:{v}" for seed, v in zip(seeds, s["values"]) if v is not None)
                    out.writerow([a["arm"].name, metric.key, s["n"], s["mean"], s["spread"], s["diff"], s["ratio"],
                                  s["beyond"], a["compared"], values])


def report_json(settings: Settings, arms: list[dict], numbers: dict, env: dict, notes: dict) -> dict:
    return {"config": settings.config, "command": settings.command, "comparison": settings.budget.describe(),
            "budget": {"kind": settings.budget.kind, "value": settings.budget.value}, "seeds": settings.seeds,
            "environment": env, "metric_notes": notes,
            "spread": "standard deviation over seeds (n-1); beyond = |diff| > spread(arm) + spread(full)",
            "arms": [{"name": a["arm"].name, "description": a["arm"].description, "overrides": list(a["arm"].overrides),
                      "stand_in_teachers": a["stand_ins"], "compared": a["compared"], "notes": a["notes"],
                      "runs": [{"seed": run.seed, "run_dir": str(run.run_dir), "config_overrides": run.overrides,
                                **{k: (state or {}).get(k) for k in ("result", "curve", "notes")}}
                               for run, state in a["runs"]]} for a in arms],
            "summary": numbers}


def write_report(settings: Settings, runs: list[ArmRun], plots: bool = True) -> list[str]:
    """results.md, results.csv, results.json (and the plots, TensorBoard curves) in OUT; the lines to print."""
    arms = collect(runs)
    numbers = summaries(arms, {k: len(v) for k, v in judge_sets(settings.judge_prompts).items()})
    env = environment()
    notes = next((s["metric_notes"] for a in arms for _, s in a["runs"] if s and s.get("metric_notes")), {})
    out = settings.out
    made, note = write_plots(out, arms, numbers) if plots else ([], None)
    (out / "results.md").write_text(markdown(settings, arms, numbers, env, notes, made))
    write_csv(out / "results.csv", arms, numbers)
    data = report_json(settings, arms, numbers, env, notes)
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    lines = [f"[ablate] results: {out / 'results.md'} (+ results.csv, results.json)"]
    if made:
        lines.append(f"[ablate] plots: {', '.join(Path(p).name for p in made)} in {out}; curves in TensorBoard: "
                     f"tensorboard --logdir {out}")
    if note:
        lines.append(f"[ablate] {note}")
    return lines
