"""LoRA adapters on prx's PRX through ``peft`` (no adapter layers of prx's own).

:func:`add_lora` puts peft's ``lora.Linear`` around the targeted projections of a :class:`~prx.model.PRX` in place
(``peft.inject_adapter_in_model``): the model keeps its class, its forward and its ``muon_params`` /
``adam_params`` (which then hold the adapters only, the base being frozen). The adapters' state dict is small
(:func:`lora_state_dict`), :func:`merge_lora` folds them into the base weights with peft's own merge, and
:func:`save_diffusers_adapter` writes them in peft's format for diffusers' ``PRXTransformer2DModel``::

    from peft import PeftModel
    pipe = PRXPixelPipeline.from_pretrained("Photoroom/prxpixel-t2i", torch_dtype=torch.bfloat16)
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, "my-adapter").merge_and_unload()

Names: prx's projections are diffusers' under other names (prx.diffusers_io). The one that differs in shape is
the GeGLU input: prx's fused ``mlp_in`` (rows: gate, then up) is diffusers' ``gate_proj`` and ``up_proj``. A LoRA
on ``mlp_in``, ΔW = s·B·A, is exactly a LoRA on each half with the same A and B's rows split the same way
(ΔW_gate = s·B[:m]·A, ΔW_up = s·B[m:]·A), so the export is exact, not a re-fit.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from prx.config.model import DEFAULT_LORA_TARGETS, LoRAConfig
from prx.config.pretrained import find_transformer_dir
from prx.config.rules import check_fields
from prx.diffusers_io import diffusers_name, load_init_weights
from prx.errors import CheckpointError, ConfigError
from prx.model import build_model

ADAPTER_NAME = "default"  # peft's adapter name; prx trains one adapter at a time
DEFAULT_TARGETS = DEFAULT_LORA_TARGETS
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names: PeftModel.from_pretrained reads these
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained prefixes an adapter's keys


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The full names of the Linear layers ``targets`` match, in model order; a one-line error for a target that
    matches nothing, or something that is not a Linear layer."""
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for target in targets:
        if re.fullmatch(r"[A-Za-z_]\w*", target):  # a short name: that projection in every block
            pattern = rf"blocks\.\d+\.{target}"
        else:
            pattern = target
        try:
            found = [name for name in modules if re.fullmatch(pattern, name)]
        except re.error as e:
            raise ConfigError(f"lora.targets: '{target}' is not a valid regular expression ({e})") from None
        if not found:
            raise ConfigError(f"lora.targets: '{target}' matches no module of this model: use one of "
                              f"{', '.join(DEFAULT_TARGETS)} (every block) or a full name such as blocks.0.img_qkv")
        for name in found:
            if not isinstance(modules[name], nn.Linear):
                raise ConfigError(f"lora.targets: '{target}' matches {name}, a {type(modules[name]).__name__}: "
                                  f"LoRA adapts Linear layers only")
        chosen.update(found)
    return [name for name in modules if name in chosen]


def peft_config(cfg: LoRAConfig, modules: list[str]):
    """peft's LoraConfig for these full module names (B = 0 at init: an added adapter changes nothing)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(modules),
                      bias="none", init_lora_weights=True)


# --------------------------------------------------------------------------------------------
# On the model
# --------------------------------------------------------------------------------------------


def add_lora(model: nn.Module, cfg: LoRAConfig, base_dtype: torch.dtype | None = None) -> list[str]:
    """Add LoRA adapters to ``model`` in place (peft), freeze everything else, and return the adapted modules' names.

    ``base_dtype`` (e.g. torch.bfloat16) casts the frozen weights; the adapters stay in their dtype (fp32). A model
    with bf16 base weights runs under bf16 autocast, as the trainer's GPU steps do.
    """
    from peft import inject_adapter_in_model

    check_fields(cfg, "lora")
    cfg.check()
    if has_lora(model):
        raise ConfigError("this model already has LoRA adapters: add them once")
    modules = resolve_targets(model, cfg.targets)
    inject_adapter_in_model(peft_config(cfg, modules), model, adapter_name=ADAPTER_NAME)  # freezes the base
    for name, p in model.named_parameters():
        if p.requires_grad != is_adapter_parameter(name):  # peft's rule, checked: only the adapters train
            raise AssertionError(f"peft left {name} with requires_grad={p.requires_grad}")
        if base_dtype is not None and not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(base_dtype)
    return modules


def is_adapter_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def adapted_modules(model: nn.Module) -> list[str]:
    """The names of the modules that carry an adapter, as the base model names them (``blocks.0.img_qkv``)."""
    from peft.tuners.lora import LoraLayer

    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of an adapted model: its adapters' A and B matrices."""
    return [p for name, p in model.named_parameters() if is_adapter_parameter(name)]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights only, e.g. ``blocks.0.img_qkv.lora_A.weight`` (rank × in), ``...lora_B.weight``."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load adapter weights written by :func:`lora_state_dict`: every adapter, each with its shape, else a one-line
    error (a checkpoint of another rank or other targets)."""
    from peft import set_peft_model_state_dict

    own = lora_state_dict(model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model's adapters lack"
        raise CheckpointError(f"the adapter state {what} ({len(missing)} missing, {len(extra)} unexpected): it was "
                              f"saved with other lora.targets")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"adapter '{key}' has shape {tuple(value.shape)} in the checkpoint but "
                                  f"{tuple(own[key].shape)} here: it was saved with another lora.rank")
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (peft's merge: W + alpha/rank · B·A) and put the plain Linear layers
    back, in place: the result is a plain PRX with prx's own state dict names. Merge into fp32 base weights for an
    export (a bf16 base rounds the sum)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=[ADAPTER_NAME])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model


# --------------------------------------------------------------------------------------------
# A LoRA run: its base, its adapters, its checkpoints
# --------------------------------------------------------------------------------------------


def base_fingerprint(init_from: str | Path) -> str:
    """A short fingerprint of the base weights ``model.init_from`` names: each safetensors file's name, size and the
    SHA-256 of its first MiB (the header, which lists every tensor, and the start of the data). A LoRA checkpoint
    records it, so adapters are never applied to another base unnoticed; reading it costs milliseconds at 7B."""
    digest = hashlib.sha256()
    files = sorted(find_transformer_dir(init_from).glob("*.safetensors"))
    for file in files:
        with open(file, "rb") as f:
            digest.update(f"{file.name}:{file.stat().st_size}:".encode() + f.read(2**20))
    return digest.hexdigest()[:16]


def adapt(model: nn.Module, cfg: LoRAConfig, init_from: str | Path, saved: dict | None = None,
          where: str | Path | None = None) -> dict:
    """A LoRA run's model: the base weights loaded from ``init_from`` (a new run and a resumed one alike: a LoRA
    checkpoint holds the adapters only), adapters added, the base frozen. Returns the base's record for the
    checkpoints (``model.init_from`` and its fingerprint). ``saved``: the record of the checkpoint ``where`` whose
    adapters go on this base; another base is a one-line error, before any weight is read."""
    now = base_fingerprint(init_from)
    if saved and saved.get("fingerprint") != now:
        raise CheckpointError(f"the adapters of '{where}' were trained on the base model.init_from="
                              f"'{saved.get('init_from')}' (fingerprint {saved.get('fingerprint')}), but "
                              f"'{init_from}' holds other weights (fingerprint {now}): give that base")
    load_init_weights(model, init_from)
    add_lora(model, cfg)
    return {"init_from": str(init_from), "fingerprint": now}


def describe_lora(model: nn.Module, cfg: LoRAConfig, init_from: str | Path) -> str:
    """The run's LoRA line: what is adapted, how many parameters train, on which base."""
    trained = sum(p.numel() for p in lora_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA: rank {cfg.rank} (alpha {cfg.alpha:g}) on {len(adapted_modules(model))} projections, "
            f"{trained / 1e6:.2f}M trainable parameters ({100 * trained / total:.2f}% of {total / 1e6:.1f}M), "
            f"{cfg.optimizer} on the adapters; base {init_from} (frozen)")


def adapter_params(model_cfg, rank: int, targets: tuple[str, ...]) -> tuple[int, int]:
    """(image-side, text-side) adapter parameters of a model config, counted on the meta device: each is one
    multiply-add per token that passes its projection (``txt_kv`` sees the text tokens, the rest the image tokens)."""
    key = repr((model_cfg, rank, targets))
    if key not in _ADAPTER_PARAMS:  # (prx bench counts every step's FLOPs)
        _ADAPTER_PARAMS[key] = _count_adapter_params(model_cfg, rank, targets)
    return _ADAPTER_PARAMS[key]


_ADAPTER_PARAMS: dict[str, tuple[int, int]] = {}


def _count_adapter_params(model_cfg, rank: int, targets: tuple[str, ...]) -> tuple[int, int]:
    with torch.device("meta"):
        model = build_model(model_cfg)
        add_lora(model, LoRAConfig(enabled=True, rank=rank, targets=list(targets)))
    image = text = 0
    for name, p in model.named_parameters():
        if is_adapter_parameter(name):
            if ".txt_kv." in name:
                text += p.numel()
            else:
                image += p.numel()
    return image, text


def freeze_base_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen base weights to ``dtype`` (bf16 where the run computes in bf16: never updated, they need no
    fp32 master copy); the adapters keep theirs."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


# --------------------------------------------------------------------------------------------
# diffusers' PRXTransformer2DModel, in peft's format
# --------------------------------------------------------------------------------------------


def diffusers_modules(prx_module: str) -> list[str]:
    """The diffusers PRXTransformer2DModel module(s) of a prx Linear (mlp_in: gate_proj and up_proj)."""
    return [n.strip().removesuffix(".weight") for n in diffusers_name(f"{prx_module}.weight").split(" + ")]


def to_diffusers_adapter(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """prx adapter weights → the same adapters on PRXTransformer2DModel's modules, under peft's saved key names
    (``base_model.model.<module>.lora_{A,B}.weight``). mlp_in's adapter becomes one on gate_proj and one on
    up_proj: the same A each, B's rows split as mlp_in's are."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".lora_")  # kind: "A.weight" or "B.weight"
        names = diffusers_modules(module)
        if len(names) == 1:
            parts = [value]
        elif kind == "A.weight":
            parts = [value] * len(names)
        else:
            parts = list(value.chunk(len(names), dim=0))
        for name, part in zip(names, parts):
            out[f"{_PEFT_PREFIX}{name}.lora_{kind}"] = part.detach().to(torch.float32).contiguous().clone()
    return out


def save_diffusers_adapter(model: nn.Module, cfg: LoRAConfig, out: str | Path,
                           base_model: str | None = None) -> Path:
    """Write an adapted model's adapters as a peft adapter directory for diffusers' PRXTransformer2DModel:
    ``adapter_model.safetensors`` + ``adapter_config.json`` (``PeftModel.from_pretrained(pipe.transformer, out)``).
    ``base_model``: the pipeline it adapts (hub id or path), recorded as peft's ``base_model_name_or_path``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    modules = [m for prx_module in adapted_modules(model) for m in diffusers_modules(prx_module)]
    config = peft_config(cfg, modules)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out))  # peft writes its own adapter_config.json
    save_file(to_diffusers_adapter(lora_state_dict(model)), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def read_adapter_config(directory: str | Path) -> dict:
    """A saved adapter's ``adapter_config.json`` (rank, alpha, targets), or a one-line error."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{Path(directory)} has no {ADAPTER_CONFIG}: not a peft adapter directory") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None
