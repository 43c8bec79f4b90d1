"""Fine-tuning with only the keys a user changes: a config that sets ``model.init_from`` takes the built-in
``finetune`` config's values for the keys it does not set, and what the pipeline decides (shape, text encoder and
length, noise scale, resolution, timestep shift, REPA's block) from the pipeline."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from prx.cli import main
from prx.config import load_config
from prx.diffusers_io import from_diffusers_state_dict, read_transformer_weights
from test_diffusers import one_line_error, write_run
from test_small_data import photo_shard


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A 4-block model exported by `prx export --format diffusers`, with a 2-layer MiniLM and a noise scale, shift and
    size of its own."""
    root = tmp_path_factory.mktemp("finetune")
    config = tiny_config("model.text_dim=384", "text.num_layers=2", "text.max_length=40", "objective.noise_scale=1.5",
                         "objective.shift=2.0", "data.resolution=64")
    assert config.model.num_layers == 4
    write_run(root / "run", config)
    assert main(["export", "--format", "diffusers", "--checkpoint", str(root / "run"), "--out", str(root / "pipe")]) == 0
    return root / "pipe"


def only_data_init_and_steps(root: Path, pipe: Path, shards: Path) -> Path:
    path = root / "my-finetune.yaml"
    path.write_text(yaml.safe_dump({"data": {"shards": [str(shards)], "num_workers": 0},
                                    "model": {"init_from": str(pipe)}, "train": {"steps": 2}}))
    return path


def test_a_config_with_only_data_init_from_and_steps_follows_the_pipeline(exported, tmp_path):
    shards = photo_shard(tmp_path / "photos" / "photos.parquet", 19)
    config = load_config(only_data_init_and_steps(tmp_path, exported, shards))
    index = json.loads((exported / "model_index.json").read_text())
    assert (index["prompt_max_tokens"], index["noise_scale"], index["default_sample_size"]) == (40, 1.5, 64)
    m = config.model
    assert (m.num_layers, m.hidden_dim, m.patch_size, m.bottleneck_dim) == (4, 64, 16, 32)  # the tiny model's
    assert config.data.dataset == "shards"  # data.shards alone means shards
    assert config.text.encoder == str(exported) and config.text.max_length == 40 and config.text.num_layers is None
    assert (config.objective.noise_scale, config.objective.shift, config.sampling_shift) == (1.5, 2.0, 2.0)
    assert config.data.resolution == 64 and config.repa.block == 1  # a third of 4 blocks, within the depth
    # the finetune config's tricks: nothing that needs a download
    assert config.repa.weight == 0 and config.perceptual.lpips_weight == 0 and config.perceptual.dino_weight == 0
    assert (config.optimizer.name, config.optimizer.lr, config.train.batch_size) == ("adamw", 1e-5, 4)
    # a key the config sets stays; turning REPA on finds its block inside the model
    mine = load_config(only_data_init_and_steps(tmp_path, exported, shards), ["text.max_length=16", "repa.weight=0.5"])
    assert mine.text.max_length == 16 and mine.repa.block == 1 and mine.repa.weight == 0.5

    from prx.train import Trainer

    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    try:  # the pipeline's weights and its own (2-layer) text encoder, not the bundled 6-layer MiniLM's
        expected = from_diffusers_state_dict(read_transformer_weights(exported / "transformer"))
        assert all(torch.equal(v, expected[k]) for k, v in trainer.model.state_dict().items())
        assert trainer.text_encoder.model.config.num_hidden_layers == 2
    finally:
        trainer.close()


def test_prx_train_finetune_runs_and_exports(exported, tmp_path, capsys):
    shards = photo_shard(tmp_path / "photos" / "photos.parquet", 19)
    run = tmp_path / "run"
    assert main(["train", "finetune", f"model.init_from={exported}", f"data.shards=[{shards}]", "data.num_workers=0",
                 "train.steps=2", "logging.progress_bar=false", "--out", str(run)]) == 0
    assert "initialised from diffusers checkpoint" in capsys.readouterr().out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_from"] == str(exported) and saved["text"]["encoder"] == str(exported)
    # a run's own config resumes as it is: every key is set, the pipeline fills nothing
    assert load_config(run / "config.yaml").to_dict() == {**saved}
    assert main(["export", "--format", "diffusers", "--checkpoint", str(run), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert (again["prompt_max_tokens"], again["noise_scale"], again["default_sample_size"]) == (40, 1.5, 64)
    encoder = json.loads((tmp_path / "again" / "text_encoder" / "config.json").read_text())
    assert encoder["num_hidden_layers"] == 2


def test_the_finetune_config_needs_init_from(capsys, tmp_path):
    one_line_error(capsys, "model.init_from is required by this config: pass model.init_from=DIR",
                   "train", "finetune", "--out", str(tmp_path / "run"))
