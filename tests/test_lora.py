"""LoRA through peft on prx's PRX: defined by what an adapter is (B = 0 changes nothing; merged == adapted), and
exported in peft's format for diffusers' PRXTransformer2DModel (peft on diffusers == prx)."""

import json
from dataclasses import replace

import pytest
import torch

from conftest import tiny_config
from prx.diffusers_io import diffusers_config_of, to_diffusers_state_dict
from prx.errors import CheckpointError, ConfigError
from prx.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    adapted_modules,
    add_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    read_adapter_config,
    save_diffusers_adapter,
)
from prx.model import build_model


def model_config():
    return replace(tiny_config().model, text_dim=24, resolution_embeds=True)


def perturbed_model(seed: int = 0):
    """A tiny PRX off its (partly zero) initialisation, so its output depends on every weight."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same base weights every call
        model = build_model(model_config())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def perturb_adapters(model, seed: int = 1, scale: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(2, 3, 48, 32, generator=g), torch.randn(2, 5, 24, generator=g)  # non-square, padded text
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return x, torch.tensor([0.83, 0.31]), text, mask


def output(model, args):
    with torch.no_grad():
        return model(*args).x0


def test_adapters_start_as_the_identity_and_only_they_train():
    model, args = perturbed_model(), inputs()
    before = output(model, args)
    modules = add_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(modules) == 5 * len(model.blocks) == len(adapted_modules(model))
    assert {m.rsplit(".", 1)[1] for m in modules} == set(DEFAULT_TARGETS)
    assert torch.equal(output(model, args), before)  # B = 0: the adapted model is the base model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the recipe's optimizer split sees only the adapters: all 2D block matrices, so Muon's group
    assert {id(p) for p in model.muon_params} == {id(p) for p in lora_parameters(model)} and not model.adam_params
    state = lora_state_dict(model)
    assert set(state) == {f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    assert state["blocks.0.mlp_in.lora_A.weight"].shape == (4, model.config.hidden_dim)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(v.numel() for v in state.values()) < 0.2 * base  # small next to the base (a few % on a 7B model)


def test_merged_model_equals_adapted_model_and_state_round_trips():
    model, args = perturbed_model(), inputs()
    base_out = output(model, args)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=["img_qkv", "mlp_in", r"blocks\.1\.attn_out"]))
    perturb_adapters(model)
    adapted = output(model, args)
    assert not torch.allclose(adapted, base_out, atol=1e-3)  # the adapters do something
    # the adapters alone reload into a fresh adapted base: the same function
    other = perturbed_model()
    add_lora(other, LoRAConfig(rank=4, alpha=8, targets=["img_qkv", "mlp_in", r"blocks\.1\.attn_out"]))
    load_lora_state_dict(other, lora_state_dict(model))
    torch.testing.assert_close(output(other, args), adapted, rtol=0, atol=0)
    merged = merge_lora(model)
    assert not adapted_modules(merged)
    assert set(merged.state_dict()) == set(perturbed_model().state_dict())  # prx's own names again
    torch.testing.assert_close(output(merged, args), adapted, rtol=1e-5, atol=1e-5)


def test_diffusers_adapter_applied_with_peft_gives_prx_output(tmp_path):
    """The exported adapter on diffusers' PRXTransformer2DModel (mlp_in split into gate_proj and up_proj), applied
    the way a diffusers user does, gives prx's adapted output; merged by peft too."""
    from diffusers import PRXTransformer2DModel
    from peft import PeftModel

    model, args = perturbed_model(), inputs()
    base_state = to_diffusers_state_dict(model.state_dict())
    cfg = LoRAConfig(rank=4, alpha=6)
    add_lora(model, cfg)
    perturb_adapters(model)
    ours = output(model, args)
    out = save_diffusers_adapter(model, cfg, tmp_path / "adapter", base_model="my/base-pipeline")
    written = read_adapter_config(out)
    assert written == json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4 and written["lora_alpha"] == 6
    assert "blocks.0.gate_proj" in written["target_modules"] and "blocks.0.attention.to_out.0" in written["target_modules"]
    assert written["base_model_name_or_path"] == "my/base-pipeline"

    def diffusers_model():
        m = PRXTransformer2DModel(**{k: v for k, v in diffusers_config_of(model_config()).items() if not k.startswith("_")})
        m.load_state_dict(base_state)
        return m.eval()

    x, t, text, mask = args
    theirs = PeftModel.from_pretrained(diffusers_model(), str(out))
    with torch.no_grad():
        got = theirs(hidden_states=x, timestep=t, encoder_hidden_states=text, attention_mask=mask).sample
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)
    merged = PeftModel.from_pretrained(diffusers_model(), str(out)).merge_and_unload()
    assert type(merged) is PRXTransformer2DModel
    with torch.no_grad():
        got = merged(hidden_states=x, timestep=t, encoder_hidden_states=text, attention_mask=mask).sample
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)


def test_bf16_base_trains_fp32_adapters_under_autocast():
    model, args = perturbed_model(), inputs()
    reference = output(model, args)
    add_lora(model, LoRAConfig(rank=4), base_dtype=torch.bfloat16)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and {p.dtype for p in lora_parameters(model)} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*args).x0
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()  # bf16 rounding only
    out.square().mean().backward()
    grads = [p.grad for p in lora_parameters(model)]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # B = 0 at init: B's gradients are the nonzero ones
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_bad_adapter_settings_are_one_line_errors():
    def refused(error, fragment, **settings):
        with pytest.raises(error) as e:
            add_lora(perturbed_model(), LoRAConfig(**settings))
        assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)

    refused(ConfigError, "lora.rank must be positive, got 0", rank=0)
    refused(ConfigError, "'qkv_proj' matches no module", targets=["img_qkv", "qkv_proj"])
    refused(ConfigError, "a RMSNorm: LoRA adapts Linear layers only", targets=[r"blocks\.0\.q_norm"])
    refused(ConfigError, "lora.targets is empty", targets=[])
    model = perturbed_model()
    add_lora(model, LoRAConfig(rank=4))
    other = perturbed_model()
    add_lora(other, LoRAConfig(rank=8))
    with pytest.raises(CheckpointError, match="another lora.rank"):
        load_lora_state_dict(other, lora_state_dict(model))
    fewer = perturbed_model()
    add_lora(fewer, LoRAConfig(rank=4, targets=["img_qkv"]))
    with pytest.raises(CheckpointError, match="other lora.targets"):
        load_lora_state_dict(fewer, lora_state_dict(model))
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        add_lora(model, LoRAConfig(rank=4))
