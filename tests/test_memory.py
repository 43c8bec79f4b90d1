"""The memory planner: its traced part equals the CPU allocator's count of a real step, deep models extrapolate
exactly from shallow traces, and its choices follow the budget."""

import json
from dataclasses import replace

import pytest
import torch

from conftest import tiny_config
from prx.errors import ConfigError
from prx.lora import LoRAConfig
from prx.memory import GiB, TextEncoderSpec, lpips_vgg_teacher, plan_memory
from prx.memory_trace import count_params, measured_step_peak, trace_step


def small(layers: int = 2, hidden: int = 128, text_dim: int = 32):
    return replace(tiny_config().model, hidden_dim=hidden, num_layers=layers, num_heads=hidden // 64, patch_size=16,
                   bottleneck_dim=64, text_dim=text_dim)


@pytest.mark.slow  # real steps under the profiler
@pytest.mark.parametrize("settings", [
    dict(),  # fp32, every weight trained
    dict(lora=LoRAConfig(rank=4), autocast=torch.bfloat16, checkpointing=True, micro_batches=2),
], ids=["full-fp32", "lora-bf16-checkpointing"])
def test_traced_peak_is_the_cpu_allocators_peak(settings):
    """Fake tensors, counted, against torch's own count of the same step really run (profiler, profile_memory)."""
    settings = {"autocast": None, **settings}
    shape = dict(height=32, width=48, micro_batch=2, text_tokens=8)
    model = small()
    predicted = trace_step(model, exact=True, **shape, **settings).peak
    measured = measured_step_peak(model, **shape, **settings)
    print(f"{settings}: predicted {predicted / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB")
    assert abs(predicted - measured) <= 0.15 * measured


@pytest.mark.slow  # three traced depths each
@pytest.mark.parametrize("settings", [dict(checkpointing=True, lora=LoRAConfig(rank=4)), dict(micro_batches=2)],
                         ids=["lora-checkpointing", "full-accumulating"])
def test_deep_models_extrapolate_exactly_from_four_and_five_blocks(settings):
    """The peak moves (the forward's activations, the backward's gradients): each part of the step extrapolates."""
    shape = dict(height=32, width=48, micro_batch=2, text_tokens=8, **settings)
    extrapolated, exact = trace_step(small(layers=7), **shape), trace_step(small(layers=7), exact=True, **shape)
    assert (extrapolated.params, extrapolated.peak, extrapolated.grads_at_peak, extrapolated.grads) == (
        exact.params, exact.peak, exact.grads_at_peak, exact.grads)


def test_a_7b_model_plans_on_fake_tensors():
    """The released 7B PRXPixel's shape: counted on the meta device, its step traced on fake tensors (no memory)."""
    from prx.released import prxpixel_7b_model_config

    model, lora = prxpixel_7b_model_config(), LoRAConfig(rank=16)
    counts = count_params(model, lora)
    assert 6.9e9 < counts.total - counts.trained < 7.1e9 and counts.trained == 16 * 77056 * 24
    trace = trace_step(model, lora=lora, height=512, width=512, micro_batch=1, text_tokens=256, checkpointing=True)
    assert trace.params == (counts.total - counts.trained) * 2 + counts.trained * 4  # bf16 base, fp32 adapters
    per_block_input = 32 * 32 * 3584 * 2  # 512 px in 16-px patches, bf16
    assert 24 * per_block_input < trace.activations < 2 * GiB  # each block's input kept, one block's insides


def test_choices_follow_the_budget():
    model, lora = small(layers=2, hidden=256), LoRAConfig(rank=4)
    common = dict(resolution=256, batch_size=4, lora=lora, text_tokens=16)
    roomy = plan_memory(model, gpu_memory=64, **common)
    assert roomy.fits and roomy.choice.micro_batch == 4 and not roomy.choice.checkpointing
    # a budget that only micro-batch 1 without checkpointing fits
    one = plan_memory(model, gpu_memory=64, micro_batch=1, checkpointing=False, **common)
    budget = int(one.peak / 0.95) + 1
    tight = plan_memory(model, gpu_memory=budget, **common)
    assert tight.fits and tight.choice.micro_batch == 1 and not tight.choice.checkpointing and tight.accumulation == 4
    # less than that, more than micro-batch 1 with checkpointing: checkpointing
    recomputed = plan_memory(model, gpu_memory=64, micro_batch=1, checkpointing=True, **common)
    assert recomputed.peak < one.peak == recomputed.without_checkpointing
    checkpointed = plan_memory(model, gpu_memory=int((recomputed.peak + one.peak) / 2 / 0.95), **common)
    assert checkpointed.fits and checkpointed.choice.checkpointing and checkpointed.choice.micro_batch == 1
    # a text encoder that does not fit beside the step: its embeddings are precomputed
    big = TextEncoderSpec("big", params=int(budget / 2), hidden=64, intermediate=128)
    plan = plan_memory(model, gpu_memory=budget, text_encoder=big, **common)
    assert plan.fits and plan.choice.text == "precomputed"
    assert "precomputed text embeddings" in plan.describe()
    # a perceptual loss's VGG: its weights stay, the prediction's activations are kept for the backward
    lpips = lpips_vgg_teacher(128, 128)
    with_lpips = plan_memory(model, gpu_memory=64, micro_batch=1, checkpointing=False, teachers=(lpips,), **common)
    assert with_lpips.peak - one.peak == lpips.weights + lpips.saved  # the forward+backward phase is the peak


def test_sharding_divides_the_states_and_what_does_not_fit_says_what_would():
    model = small(layers=2, hidden=256)
    counts = count_params(model)
    plan = plan_memory(model, resolution=32, batch_size=2, gpu_memory=64, gpus=2, text_tokens=8)
    assert plan.choice.sharding == "fsdp2"
    parts = {p.name: p.bytes for p in plan.components}
    assert parts["weights (sharded)"] == counts.total * 4 // 2 and parts["optimizer states (sharded)"] == counts.total * 8 // 2
    # a GPU smaller than the CUDA context: nothing fits, and the plan says how much would
    tiny = plan_memory(model, resolution=32, batch_size=2, gpu_memory=0.5, text_tokens=8, lora=LoRAConfig(rank=4))
    assert not tiny.fits and tiny.changes and "a GPU with at least 1 GiB" in tiny.changes[-1]
    assert "does NOT fit" in tiny.describe() and "smallest change that fits" in tiny.describe()


def test_bad_plans_are_one_line_errors():
    with pytest.raises(ConfigError, match="does not split over 3 GPUs"):
        plan_memory(small(), resolution=64, batch_size=8, gpu_memory=24, gpus=3)
    with pytest.raises(ConfigError, match="text_dim"):
        plan_memory(replace(small(), text_dim=None), resolution=64, batch_size=8, gpu_memory=24)
    assert GiB == 2**30


# -------------------------------------------------------------------------------------------
# prx plan, and the first lines of prx train on a GPU
# -------------------------------------------------------------------------------------------


def test_prx_plan_of_a_small_config_fits_and_says_so(capsys):
    from prx.cli import main

    assert main(["plan", "tiny", "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "fits in 24 GiB" in out and "choice: micro-batch 4" in out, out
    assert main(["plan", "tiny", "--gpu-memory", "24GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["choice"]["micro_batch"] == 4 and data["peak"] > 0


@pytest.mark.parametrize("size,bytes_", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("24", 24 * 2**30),
                                         ("0.5 TiB", 2**39)])
def test_gpu_memory_sizes(size, bytes_):
    from prx.commands.plan import parse_size

    assert parse_size(size) == bytes_


def test_bad_plan_arguments_are_one_line(capsys):
    from test_diffusers import one_line_error

    one_line_error(capsys, "--gpu-memory 'lots' is not a size", "plan", "tiny", "--gpu-memory", "lots")
    one_line_error(capsys, "--gpus 0", "plan", "tiny", "--gpu-memory", "24GiB", "--gpus", "0")


@pytest.mark.slow  # about ten traced steps: the search, then the changes that would fit
def test_what_does_not_fit_is_said_at_train_start_and_by_prx_plan_with_the_change_that_would(capsys):
    from prx.cli import main
    from prx.config import load_config
    from prx.memory_plan import train_start_lines

    config = load_config("tiny")
    (line,) = train_start_lines(config, 24 * 2**30, 1, "none")
    assert line.startswith("memory plan: about") and "micro-batch 4" in line
    shape = ["model.hidden_dim=1024", "model.num_layers=8", "model.num_heads=8", "data.resolution=512",
             "train.batch_size=64", "model.patch_size=16"]
    # the run as configured (micro-batch 64) does not fit 6 GiB; the planner's choice does
    lines = train_start_lines(load_config("tiny", shape), 6 * 2**30, 1, "none")
    assert lines[0].startswith("warning: memory plan: micro-batch 64") and "expect out of memory" in lines[0], lines
    assert "train.micro_batch_size=" in lines[1] and "activation_checkpointing" in lines[1], lines
    # nothing fits half a GiB (the CUDA context alone is more): prx plan exits 1 and names the smallest change
    code = main(["plan", "tiny", *shape, "--gpu-memory", "0.5GiB"])
    out = capsys.readouterr().out
    assert code == 1 and "does not fit" in out and "smallest change that fits:" in out, out


@pytest.mark.slow
def test_prx_plan_of_the_released_7b_lora_at_1024_fits_24_gib(capsys):
    from prx.cli import main

    assert main(["plan", "finetune", "--model", "prxpixel-7b", "lora.enabled=true", "data.resolution=1024",
                 "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "PRX 7.03B" in out and "LoRA rank 16" in out and "fits in 24 GiB" in out, out
