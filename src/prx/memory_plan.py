"""A run config's memory plan (``prx plan``, and the first lines of ``prx train`` on a GPU): the config's model,
adapters, optimizer, EMA, text encoder, teachers and largest stage, handed to :func:`prx.memory.plan_memory`.

Nothing is loaded: the model is traced on fake tensors, the text encoder and teachers are counted from their configs
(a text encoder whose config is not on this machine is left out of the plan, and the plan says so).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from prx.config import Config
from prx.config.pretrained import pipeline_text_parts
from prx.memory import Plan, TextEncoderSpec, lpips_vgg_teacher, plan_memory, text_encoder_spec, vit_teacher
from prx.model import token_count
from prx.released import prxpixel_7b_model_config, qwen3_vl_2b_text_config
from prx.teacher_shapes import teacher_shape
from prx.text import resolve_encoder, text_width

RELEASED_SHAPES = {"prxpixel-7b": "the released PRXPixel (Photoroom/prxpixel-t2i): 7B transformer, Qwen3-VL-2B text"}


@dataclass
class RunPlan:
    plan: Plan
    notes: list[str]

    def describe(self) -> str:
        return self.plan.describe() + "".join(f"\nnote: {n}" for n in self.notes)


def released_model(cfg: Config, name: str) -> Config:
    """``cfg`` with the model of a released shape (``--model prxpixel-7b``): plans need no download."""
    if name not in RELEASED_SHAPES:
        raise ValueError(name)
    shape = prxpixel_7b_model_config()
    return replace(cfg, model=replace(shape, init_from=cfg.model.init_from or "Photoroom/prxpixel-t2i"),
                   text=replace(cfg.text, max_length=256))


def text_spec(cfg: Config, released: str | None) -> tuple[TextEncoderSpec | None, str | None]:
    """The text encoder's spec from its config alone, or (None, why) when its config is not on this machine."""
    if released:
        return text_encoder_spec(qwen3_vl_2b_text_config(), "Qwen3-VL-2B text"), None
    try:
        from transformers import AutoConfig

        path = pipeline_text_parts(resolve_encoder(cfg.text.encoder))[0]
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        return text_encoder_spec(config, cfg.text.encoder), None
    except Exception as e:  # noqa: BLE001 - not on this machine: planned without it, said so
        return None, (f"text encoder '{cfg.text.encoder}' is not on this machine ({type(e).__name__}): planned as "
                      f"precomputed embeddings")


def teacher_specs(cfg: Config, height: int, width: int) -> list:
    """The frozen networks the config's tricks run each step (at their largest stage), on the tokens prx's FLOP count
    gives them: REPA's teacher on the denoiser's token grid, the DINO loss at ``perceptual.dino_resolution``."""
    specs = []
    if cfg.repa.weight > 0 and (shape := teacher_shape(cfg.repa.teacher)) is not None:
        tokens = token_count(height, width, cfg.model.patch_size)
        specs.append(vit_teacher(f"REPA {cfg.repa.teacher}", shape, tokens))
    if cfg.perceptual.dino_weight > 0 and (shape := teacher_shape(cfg.perceptual.dino_model)) is not None:
        tokens = (cfg.perceptual.dino_resolution // shape.patch_size) ** 2
        specs.append(vit_teacher(f"DINO loss {cfg.perceptual.dino_model}", shape, tokens, gradients=True))
    if cfg.perceptual.lpips_weight > 0:  # on the images resized by perceptual.lpips_resize
        r = cfg.perceptual.lpips_resize
        specs.append(lpips_vgg_teacher(int(round(height * r)), int(round(width * r))))
    return specs


def plan_run(cfg: Config, gpu_memory: float, gpus: int = 1, released: str | None = None,
             settings: dict | None = None) -> RunPlan:
    """The memory plan per rank of ``cfg``'s largest stage on ``gpus`` GPUs of ``gpu_memory`` (bytes, or GiB);
    ``settings`` fixes plan_memory's choices (micro_batch, checkpointing, text, sharding, cpu_offload)."""
    notes = []
    if released:
        cfg = released_model(cfg, released)
    stage = max(cfg.stages, key=lambda s: s.resolution * s.resolution * s.batch_size)
    model = cfg.model
    if model.text_dim is None:
        model = replace(model, text_dim=text_width(cfg.text.encoder) or 384)
    text, why = text_spec(cfg, released)
    if why:
        notes.append(why)
    lora = cfg.lora if cfg.lora.enabled else None
    optimizer = "adamw" if cfg.optimizer.name == "adamw" or (lora and cfg.lora.optimizer == "adamw") else "muon"
    # prx offloads FSDP2's shards (train.cpu_offload), so on several GPUs only
    offload = True if cfg.train.cpu_offload else (False if gpus == 1 else None)
    fixed = settings or {"micro_batch": cfg.train.micro_batch_size or None,
                         "checkpointing": True if cfg.train.activation_checkpointing else None, "cpu_offload": offload}
    plan = plan_memory(model, resolution=stage.resolution, batch_size=stage.batch_size, gpu_memory=gpu_memory,
                       gpus=gpus, lora=lora, optimizer=optimizer,
                       precision="fp32" if cfg.train.precision == "fp32" else "bf16", ema=cfg.ema.decay > 0,
                       text_encoder=text, text_tokens=cfg.text.max_length, text_cache_gib=cfg.text.cache_gib,
                       teachers=tuple(teacher_specs(cfg, stage.resolution, stage.resolution)),
                       cuda_graphs=cfg.train.cuda_graphs == "on", **fixed)
    given = [f"train.{k}" for k, v in (("micro_batch_size", fixed["micro_batch"]), ("activation_checkpointing",
             fixed["checkpointing"]), ("cpu_offload", cfg.train.cpu_offload or None)) if v is not None]
    if settings is None and given:
        notes.append("planned with the config's " + ", ".join(given))
    if settings is None and gpus == 1 and not plan.fits:
        notes.append("no CPU offload on one GPU: prx offloads FSDP2's shards (train.cpu_offload, 2 or more GPUs)")
    return RunPlan(plan, notes)


def gpu_memory_of(device: torch.device) -> int:
    """A CUDA device's total memory, bytes."""
    return torch.cuda.get_device_properties(device).total_memory


def train_start_lines(cfg: Config, gpu_memory: int, gpus: int, parallel: str) -> list[str]:
    """What ``prx train`` says first on a GPU: the plan of the run as configured, and where it would not fit, the
    planner's choice."""
    stage = max(cfg.stages, key=lambda s: s.resolution * s.resolution * s.batch_size)
    micro = cfg.train.micro_batch_size or stage.batch_size // gpus
    own = plan_run(cfg, gpu_memory, gpus, settings={
        "micro_batch": micro, "checkpointing": cfg.train.activation_checkpointing, "text": "gpu",
        "cpu_offload": cfg.train.cpu_offload,
        "sharding": {"none": "none", "ddp": "ddp", "fsdp": "fsdp2"}[parallel]}).plan
    gib = 2**30
    where = f"micro-batch {micro}, activation checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}"
    if own.choice is not None and own.fits:
        return [f"memory plan: about {own.peak / gib:.1f} GiB per rank at peak of {gpu_memory / gib:.0f} GiB "
                f"({where}, {stage.resolution} px; prx plan shows the table)"]
    best = plan_run(cfg, gpu_memory, gpus).plan
    lines = [f"warning: memory plan: {where} at {stage.resolution} px needs about "
             f"{own.peak / gib:.1f} GiB per rank, more than this {gpu_memory / gib:.0f} GiB GPU: expect out of memory"]
    if best.fits and best.choice is not None:
        c = best.choice
        lines.append(f"  the planner's choice fits ({best.peak / gib:.1f} GiB): train.micro_batch_size="
                     f"{c.micro_batch} train.activation_checkpointing={str(c.checkpointing).lower()}"
                     + (" with precomputed text embeddings (prx data embed)" if c.text == "precomputed" else "")
                     + (", FSDP2" if c.sharding == "fsdp2" else "") + (" train.cpu_offload=true" if c.cpu_offload
                                                                          else ""))
    elif best.changes:
        lines.append(f"  smallest change that fits: {best.changes[0]}")
    return lines
