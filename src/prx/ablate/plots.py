"""The ablation's plots: validation loss against FLOPs and against training time, one line per arm and
seed (PNG, matplotlib, the optional ``plots`` extra), one bar chart per metric; and the same curves in
TensorBoard under ``OUT/tensorboard/ARM-sS`` (x = GFLOP, or seconds, as the step axis).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from prx.ablate.stats import METRICS, NOT_COMPARED

CURVES = {"flops": ("val_loss_vs_flops.png", "training FLOPs", 1e-9, "GFLOP"),
          "seconds": ("val_loss_vs_time.png", "training time (s)", 1.0, "s")}


def write_plots(out: Path, arms: list[dict], numbers: dict) -> tuple[list[str], str | None]:
    """(PNG files written, a note when the PNGs were skipped). TensorBoard curves are written either way."""
    write_tensorboard(out / "tensorboard", arms)
    try:  # matplotlib is optional (the plots extra): imported only here, so the tables never need it
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ("plots skipped: matplotlib is not installed (pip install matplotlib, or pip install -e "
                    "'.[plots]' in the prx checkout); the tables are complete")
    files = [plot_curve(plt, out, arms, x) for x in CURVES]
    files += [f for f in (plot_bars(plt, out, arms, numbers, metric) for metric in _bar_metrics(numbers)) if f]
    return [str(f) for f in files if f], None


def _colours(arms: list[dict]) -> dict[str, str]:
    palette = ["black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:gray", "tab:olive", "tab:cyan"]
    return {a["arm"].name: palette[i % len(palette)] for i, a in enumerate(arms)}


def plot_curve(plt, out: Path, arms: list[dict], x: str) -> Path | None:
    """Validation loss against FLOPs or training seconds: a line per arm and seed (solid, dashed, … by seed)."""
    name, label, scale, _ = CURVES[x]
    colours, styles = _colours(arms), ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for a in arms:
        for i, (run, state) in enumerate(a["runs"]):
            curve = (state or {}).get("curve") or []
            if not curve:
                continue
            ax.plot([p[x] * scale for p in curve], [p["val_loss"] for p in curve], styles[i % len(styles)],
                    color=colours[a["arm"].name], label=f"{a['arm'].name} (seed {run.seed})", marker=".")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(label + (" (GFLOP)" if x == "flops" else ""))
    ax.set_ylabel("validation loss, held-out")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return out / name


def _bar_metrics(numbers: dict) -> list:
    return [m for m in METRICS if any(numbers[arm][m.key]["n"] for arm in numbers)]


def plot_bars(plt, out: Path, arms: list[dict], numbers: dict, metric) -> Path | None:
    """One metric: a bar per arm (mean, error bar = spread over seeds); arms not compared are hatched."""
    names = [a["arm"].name for a in arms]
    stats = [numbers[n][metric.key] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names)), 3.6))
    means = [s["mean"] if s["mean"] is not None else 0.0 for s in stats]
    errors = [s["spread"] or 0.0 for s in stats]
    colours = _colours(arms)
    bars = ax.bar(names, means, yerr=errors, capsize=4, color=[colours[n] for n in names], alpha=0.8)
    for bar, a in zip(bars, arms):
        if not a["compared"]:
            bar.set_hatch("//")
            bar.set_alpha(0.35)
    for bar, s, error in zip(bars, stats, errors):
        if s["mean"] is not None:  # the value above its error bar
            ax.annotate(metric.format(s["mean"]), (bar.get_x() + bar.get_width() / 2, bar.get_height() + error),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    _zoom(ax, *zip(*[(m, e) for m, e, s in zip(means, errors, stats) if s["mean"] is not None]))
    better = {"lower": " (lower is better)", "higher": " (higher is better)"}.get(metric.better, "")
    hatched = f"; hatched {NOT_COMPARED}: not compared" if not all(a["compared"] for a in arms) else ""
    ax.set_title(metric.label + better + hatched, fontsize=9)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / f"bar_{metric.key.replace('/', '_').replace('.', 'p')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _zoom(ax, means: list[float], errors: list[float]) -> None:
    """Close differences stay visible: the y axis spans the bars' range (and says so) when it is far from 0."""
    low = min(m - e for m, e in zip(means, errors))
    high = max(m + e for m, e in zip(means, errors))
    if low > 0 and high - low < 0.5 * high:
        pad = max(0.2 * (high - low), 1e-3 * high)
        ax.set_ylim(low - pad, high + 2 * pad)
        ax.set_ylabel("(axis does not start at 0)", fontsize=7)


def flop_unit(arms: list[dict]) -> tuple[float, str]:
    """The largest of MFLOP, GFLOP, TFLOP, PFLOP that still gives the longest curve ≥ 1000 steps on TensorBoard's
    integer axis."""
    most = max((p["flops"] for a in arms for _, s in a["runs"] for p in (s or {}).get("curve") or []), default=0.0)
    units = ((1e15, "pflop"), (1e12, "tflop"), (1e9, "gflop"))
    fitting = [(scale, name) for scale, name in units if most / scale >= 1000]
    return fitting[0] if fitting else (1e6, "mflop")


def write_tensorboard(root: Path, arms: list[dict]) -> None:
    """Each arm and seed's validation curve with FLOPs and training seconds as the step axis (integers:
    ``ablate_by_gflop/val_loss`` at step = GFLOP spent, ``ablate_by_second/…``), rewritten whole each time
    (TensorBoard keeps every event it is given)."""
    shutil.rmtree(root, ignore_errors=True)
    scale, unit = flop_unit(arms)
    for a in arms:
        for run, state in a["runs"]:
            curve = (state or {}).get("curve") or []
            if not curve:
                continue
            with SummaryWriter(str(root / run.key)) as writer:
                for point in curve:
                    for key in (k for k in point if k.startswith("val_loss")):
                        writer.add_scalar(f"ablate_by_{unit}/{key}", point[key], round(point["flops"] / scale))
                        writer.add_scalar(f"ablate_by_second/{key}", point[key], round(point["seconds"]))
