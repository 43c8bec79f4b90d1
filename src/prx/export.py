"""Exports: a run's checkpoint as a diffusers ``PRXPixelPipeline`` directory (transformer, scheduler, text encoder,
tokenizer, model card), or as one ``.safetensors`` file with its config in the metadata (``prx sample`` reads it).
Written atomically (a temporary name renamed into place), needing only prx; loading the pipeline needs only torch,
transformers and diffusers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from prx.config import Config
from prx.config.pretrained import DIFFUSERS_NORM_EPS, PIPELINE_CLASS, TRANSFORMER_CLASS
from prx.config.run import SHAPES_PROMPTS
from prx.diffusers_io import (
    DIFFUSERS_VERSION,
    NUM_TRAIN_TIMESTEPS,
    WEIGHTS_NAME,
    diffusers_config_of,
    to_diffusers_state_dict,
)
from prx.errors import PrxError
from prx.files import make_writable_dir
from prx.lora import lora_parameters, save_diffusers_adapter
from prx.pipeline import load_checkpoint_model
from prx.rundir import RunDir
from prx.text import TextEncoder


def scheduler_config(config: Config) -> dict:
    """FlowMatchEulerDiscreteScheduler with the run's sampling shift: its sigmas are prx's schedule 'diffusers'."""
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "shift": float(config.sampling_shift),
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    }


def recommended_guidance_scale(config: Config) -> float:
    """The CFG scale to use in diffusers: the run's, when it learnt an unconditional model (caption dropout)."""
    return float(config.sampling.guidance_scale) if config.data.caption_dropout > 0 else 1.0


def export_notes(config: Config) -> list[str]:
    """Where PRXPixelPipeline cannot sample the way `prx sample` does by default for this run."""
    s, notes = config.sampling, []
    if s.guidance in ("self", "both"):
        notes.append(
            f"this run samples with TREAD self-guidance by default (sampling.guidance={s.guidance}, self-guidance "
            f"scale {s.self_guidance_scale}); diffusers has no equivalent: PRXPixelPipeline uses classifier-free "
            f"guidance only (empty-caption negative), so its images match `prx sample --guidance cfg`, not the run's "
            f"default")
    if s.guidance in ("cfg", "both") and 0 < s.guidance_scale < 1:
        notes.append(f"sampling.guidance_scale={s.guidance_scale} < 1: PRXPixelPipeline guides only for scales above 1")
    if s.sampler != "euler":
        notes.append(f"this run samples with {s.sampler} by default; PRXPixelPipeline integrates with Euler "
                     f"(FlowMatchEulerDiscreteScheduler): compare with `prx sample --sampler euler`")
    if list(s.guidance_interval) != [0.0, 1.0]:
        notes.append(f"this run guides only for t in {list(s.guidance_interval)} (sampling.guidance_interval); "
                     f"PRXPixelPipeline guides at every step")
    if s.schedule != "diffusers":
        notes.append("this run samples over shift(linspace(1, 0, N+1)) (sampling.schedule=linspace, a run from before "
                     "the option); FlowMatchEulerDiscreteScheduler's sigmas differ slightly, so images differ slightly "
                     "from `prx sample`'s")
    if config.objective.noise_offset:
        notes.append(f"this run trained with offset noise (objective.noise_offset={config.objective.noise_offset}); "
                     f"PRXPixelPipeline starts from plain randn · noise_scale, so its images vary less in global "
                     f"brightness than `prx sample`'s: pass prx's starting noise as `latents=` for the same images")
    if config.model.norm_eps != DIFFUSERS_NORM_EPS:
        notes.append(f"this model was trained with LayerNorm eps {config.model.norm_eps} (model.norm_eps); "
                     f"PRXTransformer2DModel's is {DIFFUSERS_NORM_EPS}: its x0 predictions differ by a few 1e-6 "
                     f"(relative)")
    return notes


def _newest(paths: list[Path], kind: str) -> dict | None:
    """The newest of evaluations' ``results.json`` (highest step, then newest file) that hold a dict ``kind``."""
    found = []
    for path in paths:
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(results, dict) and isinstance(results.get(kind), dict):
            step = results.get("step")
            found.append((step if isinstance(step, int) else -1, path.stat().st_mtime, path, results))
    if not found:
        return None
    _, _, path, results = max(found, key=lambda item: item[:2])
    return {**results, "_path": str(path)}


def latest_eval_results(run: RunDir | Path) -> dict | None:
    """The newest ``prx eval`` of the shapes world, ``RUN/eval/*/results.json``, or None."""
    return _newest((run if isinstance(run, RunDir) else RunDir(run)).eval_results(), "sets")


def latest_real_eval_results(run: RunDir | Path) -> dict | None:
    """The newest held-out evaluation, ``RUN/eval/*/real/results.json`` (``prx eval --data`` and the run's ``eval:``
    during training write there), or None."""
    return _newest((run if isinstance(run, RunDir) else RunDir(run)).eval_results(real=True), "metrics")


def _real_eval_lines(results: dict, step: int) -> list[str]:
    settings = results.get("settings") or {}
    where = "The run's in-training evaluation (`eval:`)" if results.get("during_training") else "`prx eval --data`"
    lines = ["", "## Held-out evaluation", "",
             f"{where} at step {results.get('step', '?')}"
             + (" (not the exported step)" if results.get("step") != step else "")
             + f", {settings.get('evaluated', '?')} held-out samples at {settings.get('resolution', '?')} px, "
             f"{results.get('weights', 'ema')} weights, sampling {json.dumps(settings.get('sampling'))}:",
             "", "| metric | value | samples | note |", "|---|---|---|---|"]
    for name, r in results["metrics"].items():
        try:
            note = "biased upwards: few samples" if r.get("warning") else ""
            rows = [(name, r["value"], r.get("num_samples", r.get("num_fake")), note)]
            if name == "val_loss":
                rows += [(f"val_loss {bin_name}", b["value"], b["n"], "") for bin_name, b in r["bins"].items()]
            for label, value, n, note in rows:
                lines.append(f"| {label} | {'—' if value is None else f'{value:.5g}'} | {n} | {note} |")
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return lines


def run_prompt(config: Config) -> str:
    """The prompt of a usage example: the run's first sample-grid prompt (its data's own), else a generic one."""
    if config.logging.sample_prompts:
        return config.logging.sample_prompts[0]
    return SHAPES_PROMPTS[0] if config.data.dataset == "shapes" else "a photograph"


def usage_snippet(path: str, config: Config, prompt: str | None = None) -> str:
    s = config.sampling
    binning = "" if config.stages[-1].resolution == 1024 else ", use_resolution_binning=False"
    prompt = json.dumps(run_prompt(config) if prompt is None else prompt, ensure_ascii=False)  # a Python literal
    return (
        "from diffusers import PRXPixelPipeline\n"
        f'pipe = PRXPixelPipeline.from_pretrained("{path}")\n'
        f"image = pipe({prompt}, num_inference_steps={s.steps}, "
        f"guidance_scale={recommended_guidance_scale(config)}{binning}).images[0]"
    )


def model_card(config: Config, step: int, weights: str, params: int, notes: list[str], eval_results: dict | None,
               text_classes: tuple[str, str], name: str = "path/to/this/directory",
               real_results: dict | None = None) -> str:
    s, d, t = config.sampling, config.data, config.text
    res = config.stages[-1].resolution
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags: [prx, pixel-space, text-to-image, flow-matching]",
        "---",
        "",
        f"# {config.name}: a pixel-space PRX text-to-image model",
        "",
        f"Trained with `prx` (the PRX \"24-hour speedrun\" recipe in pixel space) and exported with "
        f"`prx export --format diffusers`: the {'EMA' if weights == 'ema' else 'raw'} weights of step "
        f"{step} of {config.total_steps}, {params / 1e6:.1f}M parameters, {res}×{res} px.",
        "",
        "## Use with diffusers",
        "",
        "```python",
        usage_snippet(name, config),
        "```",
        "",
        *_prompt_lines(config),
        f"`{name}` is this directory (or its hub id once uploaded). Needs `torch`, `transformers`, "
        "`diffusers>=0.42.1` and `ftfy` (PRXPixelPipeline cleans prompts with it), not prx. `image` is a PIL image; "
        "`output_type=\"np\"` gives floats in [0, 1]. With `guidance_scale > 1`, give one prompt per call: "
        "PRXPixelPipeline (diffusers 0.42) batches the conditional and unconditional passes of a single prompt only.",
        "",
        "## Sampling: diffusers and `prx sample`",
        "",
        f"- Scheduler: `FlowMatchEulerDiscreteScheduler(shift={config.sampling_shift})`, whose sigmas are prx's "
        f"`sampling.schedule: diffusers`: PRXPixelPipeline takes the same steps as `prx sample`.",
        f"- Starting noise: `randn · noise_scale` with noise_scale={config.objective.noise_scale} (the pipeline's "
        f"`noise_scale`); prx seeds image i with seed + i, pass that noise as `latents=` to get the same image.",
        f"- The network predicts x0; both convert it to a velocity (x_t − x0)/max(t, {config.objective.t_clamp}).",
        f"- Guidance: classifier-free on x0, the empty caption as negative (diffusers' default "
        f"`negative_prompt=\"\"`); "
        f"this run's default is `{s.guidance}` with scale {s.guidance_scale}"
        + (f" and self-guidance scale {s.self_guidance_scale}" if s.guidance != "cfg" else "")
        + f"; trained with caption dropout {d.caption_dropout}.",
        f"- Text: `{t.encoder}` ({text_classes[0]}), at most {t.max_length} tokens (the pipeline's "
        f"`prompt_max_tokens`); diffusers first cleans prompts (ftfy, HTML unescaping, surrounding spaces), which "
        f"leaves plain text as it is.",
        f"- Defaults of this run: {s.steps} steps, {s.sampler} sampler.",
    ]
    if res != 1024:
        lines.append(f"- `use_resolution_binning=False`: diffusers' aspect-ratio bins exist only for 1024 px; this "
                     f"model samples {res} px (`default_sample_size`).")
    if notes:
        lines += ["", "**Differences from `prx sample`:**", ""] + [f"- {n}" for n in notes]
    lines += _training_lines(config, step)
    if eval_results is not None:
        lines += _shapes_eval_lines(eval_results, step)
    if real_results is not None:
        lines += _real_eval_lines(real_results, step)
    lines += ["", "## Full training config", "", "```yaml", config.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def _prompt_lines(config: Config) -> list[str]:
    """The run's sample-grid prompts (its own data's captions unless its config gave them), for the model card."""
    prompts = config.logging.sample_prompts or []
    return ["The prompts of the run's sample grids, to try first:", "", *(f"- {json.dumps(p, ensure_ascii=False)}"
                                                                         for p in prompts), ""] if prompts else []


def _training_lines(config: Config, step: int) -> list[str]:
    """The model card's "Training" section: the model, data, objective, optimizer and stages of the run."""
    m, d = config.model, config.data
    stages = "\n".join(
        f"| {i + 1} | {st.resolution} | {st.steps} | {st.batch_size} | "
        f"{'on' if st.tread and config.tread.route_ratio > 0 else 'off'} | "
        f"{'on' if st.repa and config.repa.weight > 0 else 'off'} | "
        f"{'on' if st.perceptual and config.tricks(st).perceptual else 'off'} |"
        for i, st in enumerate(config.stages))
    data = {"shapes": "prx's procedural shapes world (coloured circles, squares, triangles)"}.get(
        d.dataset, f"{d.dataset}: " + ", ".join(f"`{p}`" for p in d.shards[:8]) + (" …" if len(d.shards) > 8 else ""))
    return [
        "",
        "## Training",
        "",
        f"- Model: PRX, {m.num_layers} blocks, hidden {m.hidden_dim}, {m.num_heads} heads, patch {m.patch_size}, "
        f"bottleneck {m.bottleneck_dim}, GeGLU ×{m.mlp_ratio}, LayerNorm eps {m.norm_eps}"
        + (", resolution embedding" if m.resolution_embeds else "")
        + (f" (preset `{m.preset}`)" if m.preset else "")
        + (f"; initialised from `{m.init_from}`" if m.init_from else ""),
        f"- Data: {data}; caption dropout {d.caption_dropout}",
        f"- Objective: x-prediction flow matching, logit-normal({config.objective.t_mean}, {config.objective.t_std}) "
        f"timesteps, shift {config.objective.shift}, {config.objective.uniform_fraction:.0%} uniform",
        f"- Optimizer: {config.optimizer.name}, lr {config.optimizer.lr}; EMA {config.ema.decay} every "
        f"{config.ema.update_every} steps",
        f"- Trained for {step} of {config.total_steps} steps:",
        "",
        "| stage | resolution | steps | batch | TREAD | REPA | perceptual |",
        "|---|---|---|---|---|---|---|",
        stages,
    ]


def _shapes_eval_lines(eval_results: dict, step: int) -> list[str]:
    """The model card's "Evaluation" section: the newest ``prx eval`` of the shapes world."""
    lines = [
        "",
        "## Evaluation",
        "",
        f"`prx eval` (shapes-world prompt adherence, judged from pixels) at step {eval_results.get('step', '?')}"
        + (" (not the exported step)" if eval_results.get("step") != step else "")
        + f", settings {json.dumps(eval_results.get('settings', {}))}:",
        "",
        "| prompt set | n | colour | shape | position | count | all-correct |",
        "|---|---|---|---|---|---|---|",
    ]
    for set_name, r in eval_results["sets"].items():
        try:
            lines.append(f"| {set_name} | {r['n']} | {r['color']:.1%} | {r['shape']:.1%} | {r['position']:.1%} | "
                         f"{r['count']:.1%} | {r['all_correct']:.1%} |")
        except (KeyError, TypeError, ValueError):
            continue
    return lines


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrxError(f"--out '{out}' already exists and is not empty: export writes a new directory, choose another "
                       f"--out (or remove that one)")
    if out.suffix == ".safetensors":
        raise PrxError(f"--out '{out}' names a file: --format diffusers writes a directory (use --format prx for one "
                       f".safetensors file)")


def export_pipeline(checkpoint: str | Path, out: str | Path, weights: str = "ema") -> dict:
    """Write a checkpoint as a PRXPixelPipeline directory (atomically: a temporary directory renamed into place).

    Returns what the CLI reports: out, step, params, notes (where diffusers samples differently).
    """
    out = Path(out)
    _check_out(out)
    # diffusers_config_of fails early on a model diffusers cannot hold
    ckpt, config, step, model = load_checkpoint_model(checkpoint, weights, check=lambda c: diffusers_config_of(c.model))
    transformer_config = diffusers_config_of(config.model)
    tensors = to_diffusers_state_dict(model.state_dict())
    encoder = TextEncoder.from_config(config.text, "cpu")
    text_classes = (type(encoder.model).__name__, type(encoder.tokenizer).__name__)
    notes = export_notes(config)

    make_writable_dir(out.parent if str(out.parent) else Path("."))
    remove_stale_tmp(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "transformer").mkdir(parents=True)
        (tmp / "scheduler").mkdir()
        save_file(tensors, str(tmp / "transformer" / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_json(tmp / "transformer" / "config.json", transformer_config)
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config(config))
        encoder.model.save_pretrained(str(tmp / "text_encoder"))
        encoder.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        _write_json(tmp / "model_index.json", {
            "_class_name": PIPELINE_CLASS,
            "_diffusers_version": DIFFUSERS_VERSION,
            "default_sample_size": config.stages[-1].resolution,
            "noise_scale": float(config.objective.noise_scale),
            "prompt_max_tokens": config.text.max_length,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", text_classes[0]],
            "tokenizer": ["transformers", text_classes[1]],
            "transformer": ["diffusers", TRANSFORMER_CLASS],
        })
        params = sum(v.numel() for v in tensors.values())
        run = RunDir.of_checkpoint(ckpt)
        card = model_card(config, step, weights, params, notes, latest_eval_results(run), text_classes, out.name,
                          latest_real_eval_results(run))
        (tmp / "README.md").write_text(card)
        (tmp / "prx_config.yaml").write_text(config.to_yaml())
        try:
            os.replace(tmp, out)  # onto nothing, or onto an empty directory
        except OSError as e:
            raise PrxError(f"cannot move the export into place at '{out}' ({e.strerror}): choose another "
                           f"--out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "step": step, "params": params, "notes": notes, "config": config}


def adapter_snippet(base: str, adapter: str) -> str:
    """Three lines that apply an exported adapter to a pipeline the user already has (peft on its transformer)."""
    return (f'pipe = PRXPixelPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16)\n'
            f'pipe.transformer = PeftModel.from_pretrained(pipe.transformer, "{adapter}")\n'
            f'pipe.transformer = pipe.transformer.merge_and_unload()  # optional: plain weights, full speed')


def export_adapter(checkpoint: str | Path, out: str | Path, weights: str = "ema") -> dict:
    """A LoRA run's adapters alone, in peft's format for diffusers' PRXTransformer2DModel (``adapter_model.safetensors``
    and ``adapter_config.json``, which names the base pipeline), atomically. Returns out, step, params, base."""
    out = Path(out)
    _check_out(out)
    ckpt, config, step, model = load_checkpoint_model(checkpoint, weights, merge=False)
    if not config.lora.enabled:
        raise PrxError(f"'{ckpt}' holds a full model, not LoRA adapters: export it without --adapter-only")
    make_writable_dir(out.parent if str(out.parent) else Path("."))
    remove_stale_tmp(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_diffusers_adapter(model, config.lora, tmp, base_model=config.model.init_from)
        (tmp / "README.md").write_text(
            f"# LoRA adapter (prx, step {step}, {weights} weights)\n\nRank {config.lora.rank}, alpha "
            f"{config.lora.alpha:g}, on `{config.model.init_from}`. Apply it with peft:\n\n```python\nimport torch\n"
            f"from diffusers import PRXPixelPipeline\nfrom peft import PeftModel\n\n"
            f"{adapter_snippet(str(config.model.init_from), str(out))}\n```\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(p.numel() for p in lora_parameters(model))
    return {"out": out, "step": step, "params": params, "base": str(config.model.init_from)}


def remove_stale_tmp(out: Path) -> list[Path]:
    """Remove what a killed export to ``out`` left (``.NAME.tmp-PID`` beside it, whose process is gone)."""
    removed = []
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, under another user
        return True
    return True


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_safetensors(checkpoint: str | Path, out: str | Path, weights: str = "ema") -> dict:
    """A checkpoint's EMA (or raw) weights as one safetensors file with its config in the metadata (and beside it as
    YAML), for ``prx sample --checkpoint FILE.safetensors`` anywhere. Returns out, step and params."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise PrxError(f"--out {out} should end in .safetensors (or use --format diffusers to write a pipeline "
                       f"directory)")
    if out.is_dir() or out.with_suffix(".yaml").is_dir():
        raise PrxError(f"--out {out} is a directory: give the path of a new .safetensors file")
    ckpt, config, step, model = load_checkpoint_model(checkpoint, weights)
    make_writable_dir(out.parent if str(out.parent) else Path("."))
    remove_stale_tmp(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"prx_config": config.to_yaml(), "step": str(step), "weights": weights})
        tmp.replace(out)
    except OSError as e:
        raise PrxError(f"cannot write --out {out} ({e.strerror or e}): choose another path") from None
    finally:
        tmp.unlink(missing_ok=True)
    config.save(out.with_suffix(".yaml"))
    return {"out": out, "step": step, "params": sum(v.numel() for v in model.state_dict().values())}
