"""``model:`` the PRX transformer's shape, and the named sizes (presets)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from prx.config.rules import at_least, check, one_of, positive, within
from prx.errors import ConfigError

# Named model sizes. `seed` is the speedrun seed config; `prx-small` the reference code's
# PRX-small; `demo`/`tiny` run on a laptop CPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(patch_size=32, bottleneck_dim=256, hidden_dim=1024, num_layers=24, num_heads=16, mlp_ratio=3.5),
    "prx-small": dict(patch_size=32, bottleneck_dim=256, hidden_dim=1792, num_layers=16, num_heads=28, mlp_ratio=3.5),
    "prx-base": dict(patch_size=32, bottleneck_dim=256, hidden_dim=3584, num_layers=24, num_heads=28, mlp_ratio=3.5),
    "demo": dict(patch_size=8, bottleneck_dim=64, hidden_dim=256, num_layers=6, num_heads=4, mlp_ratio=3.0),
    "tiny": dict(patch_size=8, bottleneck_dim=32, hidden_dim=64, num_layers=4, num_heads=2, mlp_ratio=2.0),
}


@dataclass
class ModelConfig:
    """``model:`` the PRX transformer. ``preset`` fills every field not set explicitly."""

    preset: str | None = None
    patch_size: int = positive(32)
    bottleneck_dim: int = positive(256)  # linear bottleneck of the patch embedding: 3·p² → this → hidden
    hidden_dim: int = positive(1024)
    num_layers: int = positive(24)
    num_heads: int = positive(16)
    mlp_ratio: float = positive(3.5)  # GeGLU hidden size = mlp_ratio · hidden_dim
    rope_theta: float = positive(10000.0)
    text_dim: int | None = positive(None)  # set from the text encoder when the model is built
    # LayerNorm eps of the blocks and the final layer: 1e-6 as diffusers' PRXTransformer2DModel. Runs saved
    # before this option existed trained with 1e-5 and keep it (prx.checkpoint.migrate_saved_config).
    norm_eps: float = within(1e-6, 0, 1, open_low=True, open_high=True, hint=": 1e-6 (new runs) or 1e-5")
    # add an embedding of the image's (height, width) in pixels to the timestep vector (diffusers' `resolution_embeds`)
    resolution_embeds: bool = False
    # std of the patch embedding's initial bias (0: zeros, as PRX). Without a bias a flat patch of grey g embeds
    # to g times one vector, and every LayerNorm after it sees the same token for every grey: the model cannot
    # tell a flat 225 from a flat 245 (benchmarks/brightness_probe.py). Initialisation only: not a shape field.
    patch_bias_std: float = at_least(0.0, 0)
    # a diffusers PRX pixel checkpoint (a transformer/ or a whole pipeline directory) a new run starts from;
    # shape fields not set in the config come from its config.json (prx.diffusers_io)
    init_from: str | None = None

    def check(self, run=None) -> None:
        check(self.hidden_dim % self.num_heads == 0, f"model.hidden_dim={self.hidden_dim} is not divisible by "
              f"model.num_heads={self.num_heads}: pick a head count that divides it")
        head_dim = self.hidden_dim // self.num_heads
        check(head_dim % 4 == 0, f"head dim model.hidden_dim/model.num_heads = {head_dim} must be a multiple of 4 "
                                 f"for 2D RoPE: change num_heads")
        patch_dim = 3 * self.patch_size**2
        check(self.bottleneck_dim <= patch_dim, f"model.bottleneck_dim={self.bottleneck_dim} is larger than the patch "
              f"dimension 3·{self.patch_size}² = {patch_dim}: use a bottleneck ≤ {patch_dim}")


# model fields that say how a run started, not what its weights are: they may differ on resume
HOW_IT_STARTED = dict(text_dim=None, init_from=None, patch_bias_std=0.0, norm_eps=1e-6)


def same_model(saved: ModelConfig, new: ModelConfig) -> bool:
    """Whether a config's model has the saved run's weights (a text width left unset takes the run's)."""
    return replace(saved, **HOW_IT_STARTED) == replace(new, **HOW_IT_STARTED) and (
        new.text_dim is None or saved.text_dim == new.text_dim)


DEFAULT_LORA_TARGETS = ("img_qkv", "txt_kv", "attn_out", "mlp_in", "mlp_out")  # attention and MLP of every block


@dataclass
class LoRAConfig:
    """``lora:`` low-rank adapters on the transformer's projections; the base weights stay frozen."""

    enabled: bool = False
    rank: int = positive(16, ": the adapters' rank, e.g. 16 (to train every weight, leave lora.enabled false)")
    alpha: float = positive(16.0)  # the update is scaled by alpha / rank
    dropout: float = within(0.0, 0, 1, open_high=True)  # on the adapters' input, training only
    # prx module names: a projection of every block (img_qkv, txt_kv, attn_out, mlp_in, mlp_out), or a regular
    # expression for whole names (e.g. "blocks\.(1[6-9]|2[0-3])\.mlp_.*", "final_layer.proj"); Linear layers only
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    # the frozen base weights' dtype where the trainer computes in bf16 (they are never updated, so they need no
    # fp32 master copy); the adapters stay fp32
    base_dtype: str = one_of("bfloat16", "float32")
    # the adapters' optimizer: AdamW (it beat Muon on adapter matrices at each one's best learning rate,
    # docs/finetune.md), or the run's optimizer.name
    optimizer: str = one_of("adamw", "optimizer.name")

    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("rank", "alpha", "targets", "optimizer")

    def check_resume(self, saved: "LoRAConfig") -> None:
        if saved.enabled and not self.enabled:
            raise ConfigError("this run trains LoRA adapters (its checkpoints hold them alone): resume it with "
                              "lora.enabled=true, or `prx export` its merged model and start a new run from that")
        if self.enabled and not saved.enabled:
            raise ConfigError("lora.enabled=true cannot resume a run trained without adapters: `prx export RUN "
                              "--format diffusers --out DIR`, then a new run with model.init_from=DIR "
                              "lora.enabled=true")

    def check(self, run=None) -> None:
        check(len(self.targets) > 0, "lora.targets is empty: name the projections to adapt, e.g. [img_qkv, mlp_in]")
        if run is None or not self.enabled:
            return
        check(bool(run.model.init_from), "lora.enabled adapts a trained model: set model.init_from to a "
              "PRXPixelPipeline directory (or its hub id), e.g. `prx train finetune model.init_from=DIR "
              "lora.enabled=true`")
        check(run.train.parallel != "fsdp", "lora.enabled with train.parallel=fsdp: adapters train with DDP (the "
              "frozen base is replicated; `prx plan CONFIG` says whether it fits), so set train.parallel=auto or ddp")
