"""The execution plan: every compile / CUDA-graph / attention / precision decision, made once from the config and the
hardware (a GPU is named, not needed: the plan only reads the device's type)."""

import json

import pytest
import torch

from prx.config import load_config
from prx.execution import (
    STATIC_SHAPES_AUTO,
    attention_kernel,
    block_shapes,
    plan_inference,
    plan_training,
    recompile_limit,
    steady_shapes,
)

GPU, CPU = torch.device("cuda"), torch.device("cpu")
FEW, MANY = {(2, n, False) for n in range(STATIC_SHAPES_AUTO)}, {(2, n, False) for n in range(STATIC_SHAPES_AUTO + 1)}
STEADY = ["text.min_length=32", "text.max_length=32", "train.micro_batch_size=0"]  # one micro-batch, one length


def plan(overrides=(), device=GPU, world=1, shapes=FEW):
    return plan_training(load_config("speedrun-tiny", [*STEADY, *overrides]), device, world, shapes)


def test_block_shapes_are_every_stage_bucket_micro_batch_and_route():
    """(micro-batch, image tokens, routed) over the stages, their buckets and the ranks' micro-batches."""
    cfg = load_config("speedrun-tiny", [])
    p = cfg.model.patch_size
    n64, n128 = (64 // p) ** 2, (128 // p) ** 2

    def squares(stage):
        return [(stage.resolution, stage.resolution)]

    def kept(n):
        return n // 2

    # micro-batch 2; stage 2's batch of 2 is one micro-batch on 1 rank and 1 sample on each of 2 ranks
    assert block_shapes(cfg, squares, 1, kept) == {(2, n64, False), (2, n64 // 2, True), (2, n128, False),
                                                   (2, n128 // 2, True)}
    assert (1, n128, False) in block_shapes(cfg, squares, 2, kept)
    assert all(not routed for _, _, routed in block_shapes(cfg, squares, 1, None))  # no TREAD: no routed calls
    assert recompile_limit(block_shapes(cfg, squares, 1, kept)) >= 8
    assert recompile_limit(MANY) >= 2 * len(MANY) and recompile_limit(set(), muon_kinds=6) >= 20


def test_static_shapes_auto_on_a_gpu_for_few_block_shapes_and_never_on_a_cpu():
    on = ["train.compile=on"]
    assert plan(on).static_shapes and plan(on).compile_blocks
    assert not plan(on, shapes=MANY).static_shapes  # bucketed photos: torch's dynamic shapes
    assert not plan(["train.compile=off"], device=CPU).static_shapes  # the CPU demo keeps torch's choice
    assert plan(["train.compile=on", "train.compile_shapes=static"], shapes=MANY).static_shapes


def test_cuda_graphs_auto_only_where_measured_one_gpu_static_steady_shapes():
    """train.cuda_graphs: auto replays the compiled blocks as CUDA graphs on one GPU (no DDP or FSDP) with static
    image shapes, one micro-batch a step and one caption length, where it was measured; on takes the others; off and
    a CPU never. The teachers' graphs follow the blocks' under auto; Muon's passes compile with them."""
    auto = plan()
    assert auto.cuda_graphs and auto.teacher_graphs and auto.compile_teachers and auto.compile_optimizer
    assert not plan(world=2, overrides=["train.parallel=ddp"]).cuda_graphs
    assert plan(world=2).parallel == "fsdp" and not plan(world=2).cuda_graphs
    assert not plan_training(load_config("speedrun-tiny", []), GPU, 1, FEW).cuda_graphs  # captions of any length
    assert not plan(shapes=MANY).cuda_graphs
    assert not plan(["train.compile=off"]).cuda_graphs
    assert not plan(["train.compile=off"]).compile_teachers  # teachers compile where the blocks do (auto)
    on = plan_training(load_config("speedrun-tiny", ["train.cuda_graphs=true", "train.parallel=ddp"]), GPU, 2, MANY)
    assert on.cuda_graphs
    with pytest.raises(Exception, match="does not work with FSDP"):
        plan_training(load_config("speedrun-tiny", ["train.cuda_graphs=on"]), GPU, 2, FEW)
    off = plan(["train.cuda_graphs=false"])
    assert not off.cuda_graphs and not off.teacher_graphs and not off.compile_optimizer
    assert plan(["train.cuda_graphs_teachers=on", "train.cuda_graphs=off"]).teacher_graphs
    assert not plan(["train.cuda_graphs_teachers=off"]).teacher_graphs
    # speedrun-tiny, micro-batch 2: stage 1's batch of 4 takes two micro-batches on one rank, one on each of two
    fixed = ["text.min_length=32", "text.max_length=32"]
    assert not steady_shapes(load_config("speedrun-tiny", fixed), 1)
    assert steady_shapes(load_config("speedrun-tiny", fixed), 2)
    assert not steady_shapes(load_config("speedrun-tiny", ["train.micro_batch_size=0"]), 1)


def test_on_a_cpu_compile_settings_that_need_a_gpu_warn_and_the_plan_says_why():
    with pytest.warns(RuntimeWarning, match="cuda_graphs=on needs compiled blocks on a GPU"), \
            pytest.warns(RuntimeWarning, match="cuda_graphs_teachers=on needs compiled teachers on a GPU"):
        cpu = plan(["train.cuda_graphs=on", "train.cuda_graphs_teachers=on", "train.compile_teachers=off"], device=CPU)
    assert not cpu.cuda_graphs and not cpu.teacher_graphs and len(cpu.notes) == 2
    assert "note: train.cuda_graphs=on" in cpu.describe()


def test_the_attention_kernel_and_precision_follow_the_device():
    cpu, cuda = CPU, GPU
    assert attention_kernel("auto", cpu, True, None, 16) == "math"  # the demo on an AVX2-only CPU
    assert attention_kernel("auto", cpu, True, torch.bfloat16, 16) == "math"  # the demo with AVX512-BF16
    assert attention_kernel("auto", cpu, False, torch.bfloat16, 64) == "math"
    assert attention_kernel("auto", cpu, False, None, 16) == "sdpa"  # fp32 eager: the fused kernel is faster
    assert attention_kernel("auto", cpu, True, torch.bfloat16, 256) == "sdpa"
    assert attention_kernel("auto", cuda, True, torch.bfloat16, 16) == "sdpa"
    assert attention_kernel("math", cuda, False, None, 4096) == "math"
    assert plan(["train.precision=bf16"]).autocast == torch.bfloat16 and plan(["train.precision=fp32"]).autocast is None
    assert plan_inference(load_config("speedrun-tiny", ["train.precision=auto"]), CPU).precision == "fp32"


def test_the_plan_is_printed_written_and_shown_by_the_dry_run(tmp_path, capsys):
    from prx.cli import main
    from prx.train import Trainer

    trainer = Trainer(load_config("tiny", ["train.steps=1", "logging.progress_bar=false", "logging.sample_every=0",
                                           "logging.tensorboard=false"]), tmp_path / "run", log=print)
    trainer.run()
    written = json.loads((tmp_path / "run" / "execution.json").read_text())
    assert written == json.loads(json.dumps(trainer.plan.to_dict())) and written["device"] == "cpu" and written["parallel"] == "none"
    out = capsys.readouterr().out
    assert trainer.plan.describe().splitlines()[0] in out
    assert main(["train", "tiny", "--dry-run"]) == 0
    assert "execution: cpu" in capsys.readouterr().out
