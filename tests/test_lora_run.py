"""A LoRA fine-tune of a pipeline, end to end: ``lora.enabled=true`` trains peft adapters on a frozen base with the
recipe's tricks on, saves the adapters alone (and a record of the base), resumes exactly, and samples and exports
the merged model; what it cannot take is one line."""

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from prx.checkpoint import checkpoint_meta
from prx.cli import main
from prx.diffusers_io import from_diffusers_state_dict, read_transformer_weights
from prx.sampling import initial_noise
from test_diffusers import DIFFUSERS_SIDE, one_line_error, write_run
from test_small_data import photo_shard

TRICKS = ["tread.route_ratio=0.5", "repa.weight=0.5", "repa.teacher=tiny-random-dinov3",
          "perceptual.lpips_weight=0.1", "perceptual.lpips_vgg_weights=tiny-random-vgg16",
          "perceptual.dino_weight=0.01", "perceptual.dino_model=tiny-random-dinov2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(a 4-block pipeline as `prx export --format diffusers` writes it, a shard of 19 photos)."""
    root = tmp_path_factory.mktemp("lora")
    config = tiny_config("model.text_dim=384", "text.num_layers=2", "data.resolution=48")
    write_run(root / "run", config)
    assert main(["export", "--format", "diffusers", "--checkpoint", str(root / "run"), "--out", str(root / "pipe")]) == 0
    return root / "pipe", photo_shard(root / "photos" / "photos.parquet", 19)


def lora_args(base, steps: int, *extra: str) -> list[str]:
    pipe, shards = base
    return ["finetune", f"model.init_from={pipe}", f"data.shards=[{shards}]", "data.num_workers=0",
            "lora.enabled=true", "lora.rank=4", "optimizer.lr=1e-2", "optimizer.warmup_steps=0",
            "train.precision=fp32", f"train.steps={steps}", "train.batch_size=2", "train.checkpoint_every=2",
            "logging.progress_bar=false", "logging.sample_every=0", *TRICKS, *extra]


def train(*argv) -> None:
    assert main(["train", *map(str, argv)]) == 0


def files_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.slow
def test_a_lora_run_trains_adapters_only_saves_megabytes_and_resumes_exactly(base, tmp_path, capsys):
    from prx.config import load_config
    from prx.train import Trainer

    pipe, _ = base
    train(*lora_args(base, 4), "--out", tmp_path / "full")
    out = capsys.readouterr().out
    assert "LoRA: rank 4 (alpha 16) on 20 projections" in out and "adamw on the adapters" in out, out
    # a run that stopped after its step-2 checkpoint (a crash before step 4's), resumed
    shutil.copytree(tmp_path / "full", tmp_path / "split", symlinks=True)
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_00000004")
    (tmp_path / "split" / "checkpoints" / "latest").unlink()
    (tmp_path / "split" / "checkpoints" / "latest").symlink_to("step_00000002")
    train(*lora_args(base, 4), "--out", tmp_path / "split")
    assert "resuming" in capsys.readouterr().out

    checkpoint = tmp_path / "full" / "checkpoints" / "step_00000004"
    meta = checkpoint_meta(checkpoint)
    assert meta["lora_base"]["init_from"] == str(pipe) and len(meta["lora_base"]["fingerprint"]) == 16
    # the 40 adapter matrices, their EMA and their AdamW state (step, 2 moments; and REPA's projector), no base
    keys = [k for f in checkpoint.glob("*.safetensors") for k in safe_open(f, "pt").keys()]
    denoiser = [k for k in keys if k.startswith(("model.denoiser.", "ema.model.", "optimizer.state.denoiser."))]
    assert len(denoiser) == 40 + 40 + 3 * 40 and all(".lora_A." in k or ".lora_B." in k for k in denoiser), denoiser

    runs = []
    for name in ("full", "split"):
        trainer = Trainer(load_config(tmp_path / name / "config.yaml"), tmp_path / name, resume=True)
        trainer.setup()
        runs.append(trainer)
        trainer.close()
    full, split = runs
    assert full.step == split.step == 4
    base_weights = from_diffusers_state_dict(read_transformer_weights(pipe / "transformer"))
    trained = 0
    for (name, a), b in zip(full.model.named_parameters(), split.model.parameters()):
        assert torch.equal(a, b), name  # the resumed run is the uninterrupted one, bit for bit
        if ".lora_B." in name:
            trained += int(a.abs().sum() > 0)  # B starts at zero: the adapters learned
        elif ".lora_" not in name:
            key = name.replace(".base_layer", "")
            assert not a.requires_grad and torch.equal(a, base_weights[key]), name  # the base never moves
    assert trained == 20
    for a, b in zip(full.ema.model.parameters(), split.ema.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_sample_and_export_give_the_merged_model_and_the_adapter_in_peft_format(base, tmp_path, capsys):
    from safetensors.torch import load_file

    from prx.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from prx.pipeline import Pipeline

    pipe_dir, _ = base
    run = tmp_path / "run"
    train(*lora_args(base, 4, "ema.decay=0"), "--out", run)  # (the EMA: the last weights, changed enough to see)
    capsys.readouterr()
    assert main(["export", "--format", "diffusers", "--checkpoint", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", "--format", "diffusers", "--adapter-only", "--checkpoint", str(run),
                 "--out", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "PeftModel.from_pretrained" in out, out

    adapter = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert (tmp_path / "adapter" / ADAPTER_CONFIG).is_file() and all(".lora_" in k for k in adapter)
    assert files_bytes(tmp_path / "adapter") < 0.5 * files_bytes(pipe_dir / "transformer")

    # prx sample of the LoRA run, and diffusers' PRXPixelPipeline of the merged export from the same noise
    steps, scale, prompts = 3, 2.0, ["a red circle in the top left", "a blue square in the bottom right"]
    lora = Pipeline.from_checkpoint(run, device="cpu")
    ours = lora.generate(prompts, steps=steps, guidance_scale=scale, seed=3, width=48, height=48).float()
    config = lora.config
    torch.save(initial_noise(2, 48, 48, 3, config.objective.noise_scale, config.objective.noise_offset),
               tmp_path / "noise.pt")
    result = subprocess.run([sys.executable, "-c", DIFFUSERS_SIDE, str(tmp_path / "merged"), str(tmp_path / "noise.pt"),
                             str(tmp_path / "images.pt"), str(steps), str(scale)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    diff = (ours - (torch.load(tmp_path / "images.pt")["guided"] * 255).round()).abs()
    print(f"mean |prx sample of the LoRA run − PRXPixelPipeline of its merged export| = {diff.mean():.4f} / 255")
    assert diff.mean() <= 1.0

    # ... and not the base model's images: the adapters changed the picture
    base_weights = from_diffusers_state_dict(read_transformer_weights(pipe_dir / "transformer"))
    write_base_run(tmp_path / "base-run", run, base_weights)
    plain = Pipeline.from_checkpoint(tmp_path / "base-run", device="cpu")
    theirs = plain.generate(prompts, steps=steps, guidance_scale=scale, seed=3, width=48, height=48).float()
    print(f"mean |LoRA run − base| = {(ours - theirs).abs().mean():.2f} / 255")
    assert (ours - theirs).abs().mean() > 1.0


def write_base_run(run: Path, lora_run: Path, weights: dict) -> None:
    """A run directory holding the base weights under the LoRA run's config (adapters off): its images are the
    base model's."""
    from prx.checkpoint import CheckpointWriter
    from prx.config import load_config

    config = load_config(lora_run / "config.yaml", ["lora.enabled=false"])
    CheckpointWriter(run).save(1, {"model": {f"denoiser.{k}": v for k, v in weights.items()},
                                   "ema": {"model": weights, "num_updates": 1}}, config)
    config.save(run / "config.yaml")


@pytest.mark.slow  # a run to resume, then nine commands
def test_what_a_lora_run_cannot_take_is_one_line(base, tmp_path, capsys):
    pipe, shards = base
    one_line_error(capsys, "lora.enabled adapts a trained model: set model.init_from", "train", "tiny",
                   "lora.enabled=true", "--out", tmp_path / "a")
    one_line_error(capsys, "lora.rank", "train", *lora_args(base, 2, "lora.rank=0"), "--out", tmp_path / "b")
    one_line_error(capsys, "lora.targets: 'qkv_nowhere' matches no module", "train",
                   *lora_args(base, 2, "lora.targets=[qkv_nowhere]"), "--out", tmp_path / "c")
    one_line_error(capsys, "train.parallel=fsdp", "train", *lora_args(base, 2, "train.parallel=fsdp"),
                   "--out", tmp_path / "d")
    train(*lora_args(base, 2), "--out", tmp_path / "run")
    capsys.readouterr()
    one_line_error(capsys, "this run trains LoRA adapters", "train", *lora_args(base, 4, "lora.enabled=false"),
                   "--out", tmp_path / "run")
    one_line_error(capsys, "lora.rank cannot change in a resumed run", "train", *lora_args(base, 4, "lora.rank=8"),
                   "--out", tmp_path / "run")
    # the same shape, other weights: the adapters are not put on it
    other = tmp_path / "other-base"
    shutil.copytree(pipe, other)
    weights = other / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state = {k: v + 0.01 if i == 0 else v for i, (k, v) in enumerate(state.items())}
    save_file(state, weights)
    one_line_error(capsys, "were trained on the base model.init_from=", "train",
                   *lora_args(base, 4, f"model.init_from={other}", f"text.encoder={pipe}"), "--out", tmp_path / "run")
    (tmp_path / "not-a-pipeline").mkdir()
    one_line_error(capsys, "not-a-pipeline", "train", *lora_args(base, 2, f"model.init_from={tmp_path}/not-a-pipeline"),
                   "--out", tmp_path / "e")


def test_lora_flops_count_no_gradient_of_the_frozen_base_and_the_adapters_passes():
    from prx.flops import step_flops
    from prx.lora import adapter_params

    full = tiny_config("model.text_dim=24", "optimizer.name=adamw")
    lora = replace(full, lora=replace(full.lora, enabled=True, rank=4))  # (the FLOPs need no base to read)
    stage = full.stages[0]
    a, b = step_flops(full, stage), step_flops(lora, stage)
    assert b["denoiser"] == a["denoiser"] * 2 / 3  # forward and input gradients; no weight gradients of the base
    image, text = adapter_params(full.model, 4, tuple(lora.lora.targets))
    n = (stage.resolution // full.model.patch_size) ** 2
    assert b["LoRA adapters"] == 3 * 2 * (image * n + text * full.text.max_length) * stage.batch_size
    assert image > 0 and text > 0


@pytest.mark.slow
def test_two_processes_train_the_same_adapters_as_one(base, tmp_path):
    """torchrun with 2 gloo ranks: train.parallel auto is DDP for LoRA (the frozen base replicated, shared with the
    EMA copy), and the loss curve is the one process's."""
    from test_distributed import COMMON, TORCHRUN, run, trajectory

    args = [*lora_args(base, 4), *COMMON]
    run([sys.executable, "-m", "prx.cli", "train", *args, "--out", str(tmp_path / "one")])
    result = run([*TORCHRUN, "-m", "prx.cli", "train", *args, "--out", str(tmp_path / "two")])
    assert "× 2 (ddp)" in result.stdout and "LoRA on a frozen fp32 base" in result.stdout, result.stdout
    one, two = trajectory(tmp_path / "one"), trajectory(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
