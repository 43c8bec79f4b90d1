"""No config key without effect: every key of the recipe's sections, changed alone, changes the training
step (its losses, the weights it writes, or the EMA it keeps)."""

import dataclasses

import pytest
import torch

BASE = [  # the whole recipe on a tiny model, one 64 px stage of 3 steps; chosen so that every key can act
    "train.stages=[{resolution: 64, steps: 3, batch_size: 4}]", "train.micro_batch_size=0",
    "optimizer.decay_fraction=0.5", "optimizer.warmup_steps=2", "optimizer.min_lr_ratio=0.1",
    "ema.decay=0.9", "ema.update_every=1", "ema.warmup=false",
    "logging.sample_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
]

CHANGES = {
    "tread": {"route_ratio": 0.25, "start_block": 0, "end_block": -1},
    "repa": {"teacher": "tiny-random-dinov2", "weight": 0.25, "block": 3, "projector_dim": 32},
    "perceptual": {"lpips_weight": 0.2, "dino_weight": 0.02, "t_threshold": 0.5, "dino_model": "tiny-random-dinov3",
                   "dino_resolution": 112, "lpips_resize": 0.75, "lpips_vgg_weights": "{vgg}", "lpips_heads": "{heads}"},
    "optimizer": {"name": "adamw", "lr": 2e-3, "betas": "[0.8, 0.9]", "eps": 1e-3, "weight_decay": 0.1,
                  "warmup_steps": 0, "decay_fraction": 0.0, "min_lr_ratio": 0.5, "grad_clip": 0.01, "muon_lr": 5e-4,
                  "muon_momentum": 0.5, "muon_nesterov": "false", "muon_ns_steps": 2, "muon_rms_scale": "false"},
    "ema": {"decay": 0.5, "update_every": 2, "warmup": "true"},
    "objective": {"t_mean": 1.0, "t_std": 0.5, "shift": 1.0, "uniform_fraction": 0.9, "t_min": 0.5, "t_clamp": 0.5,
                  "noise_scale": 2.0, "noise_offset": 0.1},
}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Another VGG16 trunk and other LPIPS heads, to point the two weight-file keys at."""
    from safetensors.torch import load_file, save_file

    from prx.lpips import BUNDLED_HEADS
    from prx.teachers import stand_in_path

    root = tmp_path_factory.mktemp("weights")
    vgg = torch.load(stand_in_path("tiny-random-vgg16"), weights_only=True)
    torch.save({k: v * 1.5 for k, v in vgg.items()}, root / "vgg.pth")
    save_file({k: v * 2.0 for k, v in load_file(str(BUNDLED_HEADS)).items()}, str(root / "heads.safetensors"))
    return {"vgg": str(root / "vgg.pth"), "heads": str(root / "heads.safetensors")}


def trace(tmp_path, text_encoder, *overrides):
    from prx.config import load_config
    from prx.train import Trainer

    trainer = Trainer(load_config("speedrun-tiny", [*BASE, *overrides]), tmp_path, text_encoder=text_encoder)
    trainer.setup()
    losses = [trainer.train_step(step).losses for step in range(3)]
    return losses, [p.detach().clone() for p in trainer.trainable.parameters()], \
        [p.detach().clone() for p in trainer.ema.model.parameters()]


@pytest.fixture(scope="module")
def base_trace(tmp_path_factory, text_encoder):
    return trace(tmp_path_factory.mktemp("base"), text_encoder)


def test_every_key_of_the_recipes_sections_is_covered():
    from prx.config import Config

    for section, changes in CHANGES.items():
        fields = {f.name for f in dataclasses.fields(type(getattr(Config(), section)))}
        assert fields == set(changes), f"{section}: untested keys {fields - set(changes)}"


@pytest.mark.parametrize("key", [f"{s}.{k}" for s, changes in CHANGES.items() for k in changes])
def test_changing_one_key_changes_the_step(key, base_trace, weight_files, tmp_path, text_encoder):
    section, name = key.split(".")
    value = str(CHANGES[section][name]).format(**weight_files)
    losses, weights, ema = trace(tmp_path, text_encoder, f"{key}={value}")
    base_losses, base_weights, base_ema = base_trace
    same = (losses == base_losses and len(weights) == len(base_weights)
            and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(weights, base_weights))
            and all(torch.equal(a, b) for a, b in zip(ema, base_ema)))
    assert not same, f"{key}={value} changed nothing in three training steps"
