"""The recipe put together: stages, the seed's Python API, the dry run, every bucket shape."""


import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch


def test_stage_switch_changes_resolution_batch_and_losses(tmp_path):
    from prx.config import load_config
    from prx.train import Trainer

    cfg = load_config("speedrun-tiny", ["logging.sample_every=0", "logging.progress_bar=false"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    seen = {}
    original = trainer.data.batch

    def spy(step, stage_index, stage):
        batch = original(step, stage_index, stage)
        seen[step] = tuple(batch.images.shape)
        return batch

    trainer.data.batch = spy
    first = trainer.train_step(0)
    last = trainer.train_step(7)
    assert seen[0] == (4, 3, 64, 64) and seen[7] == (2, 3, 128, 128)
    assert set(first.losses) == {"flow", "repa", "lpips", "dino"}
    assert set(last.losses) == {"flow", "lpips", "dino"}  # REPA off in stage 2
    assert cfg.stage_at(5)[0] == 0 and cfg.stage_at(6)[0] == 1 and cfg.total_steps == 10


@pytest.mark.slow
def test_speedrun_tiny_trains_resumes_and_self_guides(tmp_path):
    from prx.config import load_config
    from prx.pipeline import Pipeline
    from prx.train import Trainer

    overrides = ["logging.sample_every=0", "logging.progress_bar=false"]
    full = Trainer(load_config("speedrun-tiny", overrides), tmp_path / "full")
    full.run()
    half = Trainer(load_config("speedrun-tiny", overrides + ["train.stages[0].steps=6"]), tmp_path / "split")
    half.config.train.stages[1].steps = 1  # stop one step into stage 2
    half.run()
    rest = Trainer(load_config("speedrun-tiny", overrides), tmp_path / "split", resume=True)
    rest.run()
    for a, b in zip(full.trainable.parameters(), rest.trainable.parameters()):
        assert torch.allclose(a, b, atol=1e-6)  # resume in the middle of stage 2 reproduces the run
    pipe = Pipeline.from_checkpoint(tmp_path / "full", text_encoder=full.text_encoder)
    images = pipe.generate(["a red circle"], steps=2, guidance="self", self_guidance_scale=2.0)
    assert images.shape == (1, 128, 128, 3)


def test_dry_run_plan(capsys):
    from prx.cli import main

    assert main(["train", "speedrun", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 1: 512px × 100000 steps | batch 1024 (micro 32" in out
    assert "stage 2: 1024px × 20000 steps | batch 512" in out
    assert "| 256 image tokens + 256 text" in out  # every caption padded to 256 tokens, as the reference does
    assert "REPA 0.5 (dinov3, block 8, visible tokens only)" in out and "LPIPS 0.1" in out and "DINO 0.01" in out
    assert "Muon 566.2M params" in out and "TREAD 0.5 (blocks 2..22: 128/256 tokens)" in out
    assert "REPA" not in out.split("stage 2:")[1].split("\n")[1]  # stage 2's losses
    assert "FLOPs per step" in out


SEED_SNIPPET = """
from prx import PRX, Trainer, TREADRouter, REPAAlignment, PerceptualLoss

model = PRX({"patch_size": 32, "bottleneck_dim": 64, "num_layers": 8, "hidden_dim": 64})
router = TREADRouter(route_ratio=0.5, start_block=2, end_block=-2)
repa = REPAAlignment(teacher_name="dinov3", loss_weight=0.5, apply_at_block=8)
perceptual_loss = PerceptualLoss(lpips_weight=0.1, dino_weight=0.01, apply_at_all_noise_levels=True)
param_groups = [
    {"params": model.muon_params, "optimizer": "muon", "lr": 1e-4, "momentum": 0.95, "nesterov": True,
     "ns_steps": 5, "rms_scale": True},
    {"params": model.adam_params, "optimizer": "adam", "lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8},
]
trainer = Trainer(model=model, router=router, repa=repa, perceptual_loss=perceptual_loss,
                  param_groups=param_groups, batch_size=2, steps_512=2, steps_1024=1)
trainer.run()
"""


def _fake_hub_cache(hub: "os.PathLike", repo_id: str, source) -> None:
    """Lay out a local directory as the Hugging Face cache would hold a downloaded repo."""
    org, name = repo_id.split("/")
    root = os.path.join(hub, f"models--{org}--{name}")
    commit = "0" * 40
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(source, os.path.join(root, "snapshots", commit))


@pytest.mark.slow
def test_the_seed_snippet_runs_as_written(tmp_path, prx_cache):
    from prx.teachers import TEACHER_IDS, stand_in_path

    # The teachers are "downloaded": tiny random ones under the real hub ids, VGG16 where torchvision keeps it.
    hf_home = tmp_path / "hf"
    _fake_hub_cache(hf_home / "hub", TEACHER_IDS["dinov3"], stand_in_path("tiny-random-dinov3"))
    _fake_hub_cache(hf_home / "hub", TEACHER_IDS["dinov2"], stand_in_path("tiny-random-dinov2"))
    torch_home = tmp_path / "torch"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(stand_in_path("tiny-random-vgg16"), torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(torch_home)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SEED_SNIPPET)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage 2/2: 1024px, batch 1" in result.stdout + result.stderr
    assert (tmp_path / "runs" / "seed" / "checkpoints" / "latest").exists()


class BucketSource:
    """A data source that serves step k's batch in the k-th shape of ``shapes`` (random photos-to-be)."""

    def __init__(self, shapes, per_rank):
        self.shapes, self.per_rank, self.empty_embedding, self.skipped = shapes, per_rank, None, {}

    def batch(self, step, stage_index, stage):
        from prx.data.sources import DataBatch

        height, width = self.shapes[step]
        images = torch.randint(0, 256, (self.per_rank, 3, height, width), generator=torch.Generator().manual_seed(step),
                               dtype=torch.uint8)
        return DataBatch(images, [f"a photo number {step}-{i}" for i in range(self.per_rank)])


@pytest.mark.slow
def test_the_whole_recipe_trains_on_every_bucket_at_512_and_1024(tmp_path, text_encoder):
    """One step of a tiny model with TREAD, REPA, LPIPS + DINO and Muon on for each bucket shape of both
    stages (11 at 512 px, 23 at 1024 px with patch 32: 247–264 and 1015–1032 tokens)."""
    from prx.config import load_config
    from prx.data.buckets import make_buckets
    from prx.train import Trainer

    b512, b1024 = make_buckets(512, 32), make_buckets(1024, 32)
    cfg = load_config("speedrun-tiny", [
        "model.patch_size=32", "perceptual.lpips_resize=0.0625", "train.micro_batch_size=0",
        f"train.stages=[{{resolution: 512, steps: {len(b512)}, batch_size: 2}}, "
        f"{{resolution: 1024, steps: {len(b1024)}, batch_size: 2}}]",
        "logging.sample_every=0", "logging.progress_bar=false", "logging.tensorboard=false"])
    trainer = Trainer(cfg, tmp_path / "run", text_encoder=text_encoder)
    trainer.setup()
    shapes = [(b.height, b.width) for b in b512 + b1024]
    trainer.data = BucketSource(shapes, per_rank=2)
    for step, shape in enumerate(shapes):
        result = trainer.train_step(step)
        assert result.image_size == shape and not result.skipped
        assert set(result.losses) == {"flow", "repa", "lpips", "dino"} and math.isfinite(result.loss), shape
