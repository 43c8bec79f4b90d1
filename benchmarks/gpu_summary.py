"""The table of ``benchmarks/gpu_bench.sh``'s results: python benchmarks/gpu_summary.py OUT_DIR."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(out: Path, name: str):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(out: str) -> int:
    out = Path(out)
    rows = [("seed512_before", "512 px, full recipe, compiled as before (no CUDA graphs)"),
            ("seed512_recipe", "512 px, full recipe, the defaults (CUDA graphs, teachers' too)"),
            ("seed512_text_on_host", "512 px, full recipe, CUDA graphs, caption cache on the host"),
            ("seed512_teachers_no_graphs", "512 px, full recipe, CUDA graphs for the blocks only"),
            ("seed512_graphs_optimizer_eager", "512 px, full recipe, CUDA graphs, optimizer eager"),
            ("seed512_host_threads", "512 px, full recipe, CUDA graphs, fewer CPU threads"),
            ("seed512_teachers_eager", "512 px, full recipe, compiled, teachers not compiled"),
            ("seed512_encode_text", "512 px, full recipe, compiled, captions encoded in the step"),
            ("seed512_eager", "512 px, full recipe, eager"),
            ("seed512_dense", "512 px, recipe without TREAD, compiled"),
            ("seed512_fsdp1", "512 px, full recipe, compiled, FSDP2 (torchrun, 1 GPU)"),
            ("seed512_batch64", "512 px, full recipe, compiled, batch 64")]
    results = {name: load(out, name) for name, _ in rows}
    print(f"{'run':<62} {'s/step':>7} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for name, label in rows:
        r = results[name]
        if r is None:
            print(f"{label:<62} {'(no result: see the log)':>42}")
            continue
        print(f"{label:<62} {r['step_seconds']:7.3f} {r['images_per_s']:9.1f} {r['achieved_tflops']:8.1f} "
              f"{r['mfu']:6.1%} {r['peak_memory_gib']:9.1f}")
    recipe, eager, dense = results["seed512_recipe"], results["seed512_eager"], results["seed512_dense"]
    if recipe and results["seed512_teachers_eager"]:
        print(f"compiled teachers' speed-up: "
              f"{results['seed512_teachers_eager']['step_seconds'] / recipe['step_seconds']:.2f}×")
    before = results["seed512_before"]
    if recipe and before:
        print(f"CUDA graphs' speed-up (the defaults over the defaults before): "
              f"{before['step_seconds'] / recipe['step_seconds']:.2f}×")
    if recipe and results["seed512_text_on_host"]:
        print(f"the caption cache on the GPU (the default) over the cache on the host: "
              f"{results['seed512_text_on_host']['step_seconds'] / recipe['step_seconds']:.2f}×")
    if recipe and results["seed512_teachers_no_graphs"]:
        print(f"the teachers' CUDA graphs (the default) over the teachers without: "
              f"{results['seed512_teachers_no_graphs']['step_seconds'] / recipe['step_seconds']:.2f}×")
    for name, what in (("seed512_host_threads", "fewer CPU threads' speed-up"),):
        if recipe and results[name]:
            print(f"{what}: {recipe['step_seconds'] / results[name]['step_seconds']:.2f}×")
    if recipe and results["seed512_graphs_optimizer_eager"]:
        print(f"compiled optimizer's speed-up with CUDA graphs: "
              f"{results['seed512_graphs_optimizer_eager']['step_seconds'] / recipe['step_seconds']:.2f}×")
    if recipe and eager:
        print(f"compile speed-up (eager / compiled step time): {eager['step_seconds'] / recipe['step_seconds']:.2f}×")
    if recipe and dense:
        print(f"TREAD speed-up (dense / routed step time): {dense['step_seconds'] / recipe['step_seconds']:.2f}×")
    # the same steps from the same seeds: the same losses, up to bf16 rounding; the base is the first run present
    base_name = next((name for name, _ in rows if results[name] and results[name].get("losses")), None)
    if base_name:
        base = results[base_name]
        for name, label in rows:
            other = results[name]
            same_work = other and all(other.get(k) == base.get(k) for k in ("batch_per_device", "tread", "resolution"))
            if name != base_name and same_work and other.get("losses") and len(other["losses"]) == len(base["losses"]):
                worst = max(abs(a - b) / abs(a) for a, b in zip(base["losses"], other["losses"]))
                print(f"losses of '{label}' against '{base_name}', step by step: largest difference {worst:.2%}")
    for name in ("seed512_before", "seed512_recipe", "seed512_text_on_host", "seed512_teachers_no_graphs",
                 "seed512_host_threads"):
        if r := results[name]:
            phased = r.get("phased_step_seconds", r["step_seconds"])
            host = r.get("host_phases", {})
            phases = ", ".join(f"{k} {v * 1e3:.0f} ms" + (f" (host {host[k] * 1e3:.0f})" if k in host else "")
                               for k, v in sorted(r["phases"].items(), key=lambda kv: -kv[1]))
            print(f"{name} by phase (synced, {phased:.3f} s/step): {phases}")
            if "host_wait_seconds" in r:
                print(f"{name}: the host waited {r['host_wait_seconds'] * 1e3:.1f} ms of each "
                      f"{r['step_seconds'] * 1e3:.1f} ms step for the device")
    if recipe:
        print(f"MFU peak: {recipe['peak']}")
    for name, _ in rows:
        if results[name] and (p := results[name].get("profile")) and "device_busy_fraction" in p:
            print(f"{name} profiled: {p['seconds_per_step']:.3f} s/step, GPU busy {p['device_busy_fraction']:.0%}, "
                  f"{p['launches_per_step']:.0f} launches and {p['host_waits_per_step']:.0f} host waits per step")
    probe = load(out, "seed1024_micro_batch")
    if probe:
        tried = ", ".join(f"{t['micro_batch']}: " + (f"fits ({t['peak_memory_gib']:.1f} GiB, {t['step_seconds']:.2f} s)"
                                                      if t["fits"] else "out of memory") for t in probe["tried"])
        print(f"1024 px, largest micro-batch: {probe['largest_micro_batch']} ({tried})")
    attention = load(out, "attention")
    if attention:
        for case in dict.fromkeys(r["case"] for r in attention):
            times = {r["kernel"]: r["ms"] for r in attention if r["case"] == case and "ms" in r}
            if times:
                best = min((k for k in times if "floor" not in k), key=times.get)
                print(f"attention, {case}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items())
                      + f"; fastest masked: {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "bench-gpu"))
