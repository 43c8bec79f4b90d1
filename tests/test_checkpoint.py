import os

import pytest
import torch

from conftest import tiny_config
from prx.checkpoint import CheckpointWriter, find_checkpoint, load_checkpoint, make_room, training_state
from prx.errors import CheckpointError
from prx.pipeline import Pipeline
from prx.train import Trainer


def _trained(tmp_path, *overrides):
    trainer = Trainer(tiny_config("train.steps=2", *overrides), tmp_path / "run")
    trainer.run()
    return trainer


def test_round_trip_restores_everything(tmp_path):
    a = _trained(tmp_path)
    b = Trainer(tiny_config("train.steps=2"), tmp_path / "run")
    b.setup()  # resumes from the run directory's latest checkpoint
    assert b.step == 2
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(a.ema.model.parameters(), b.ema.model.parameters()):
        assert torch.equal(p, q)
    assert b.ema.num_updates == a.ema.num_updates == 2
    sa, sb = a.optimizer.optimizers[0].state_dict()["state"], b.optimizer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


def test_latest_symlink_pruning_and_a_crash_mid_write(tmp_path):
    trainer = _trained(tmp_path, "train.steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    root = tmp_path / "run" / "checkpoints"
    assert os.readlink(root / "latest") == "step_00000006"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000005", "step_00000006"]
    # A crash while writing step 7 leaves a hidden temporary directory and nothing else.
    partial = root / ".tmp_step_00000007"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a checkpoint")
    assert find_checkpoint(tmp_path / "run").name == "step_00000006"
    # A dangling `latest` (crash between rename and link) falls back to the newest complete one.
    (root / "latest").unlink()
    os.symlink("step_00000099", root / "latest")
    assert find_checkpoint(tmp_path / "run").name == "step_00000006"
    # the next save replaces the leftovers cleanly
    trainer.step = 7
    CheckpointWriter(tmp_path / "run", keep=2).save(7, training_state(trainer), trainer.config)
    assert find_checkpoint(tmp_path / "run").name == "step_00000007"


def test_a_save_short_of_room_first_removes_what_it_would_prune_and_never_the_newest(tmp_path):
    """``make_room`` on a disk of a given capacity: oldest first, only the checkpoints the save would prune once
    complete (all but the newest ``keep`` - 1, never the newest), and only until the newest's size fits."""
    def case(sizes: list[int], keep: int, capacity: int) -> list[int]:
        root = tmp_path / f"case_{len(list(tmp_path.iterdir()))}"
        for step, size in enumerate(sizes, 1):
            path = root / f"step_{step:08d}"
            path.mkdir(parents=True)
            (path / "meta.json").write_text("{}")
            (path / "config.yaml").write_text("")
            (path / "shard.safetensors").write_bytes(bytes(size - 2))

        def free(where):
            return capacity - sum(p.stat().st_size for p in where.rglob("*") if p.is_file())

        make_room(root, keep, messages.append, free_bytes=free)
        return [int(p.name[5:]) for p in sorted(root.glob("step_*"))]

    messages = []
    assert case([1000, 1000, 1000], keep=3, capacity=3500) == [2, 3]  # 500 free: one removed makes room
    assert case([1000, 1000], keep=2, capacity=3500) == [1, 2]  # 1,500 free: nothing to do
    assert case([1000, 1000, 2500], keep=2, capacity=5000) == [3]  # two removed before the newest fits
    assert case([1000, 1000, 2500], keep=3, capacity=5000) == [2, 3]  # keep 3: only the oldest may go; short still
    assert case([2500], keep=1, capacity=3000) == [1]  # the newest alone stays (the write then fails and says so)
    assert messages[0] == (f"checkpoint: 0.5 KiB free in {tmp_path / 'case_0'}, less than step_00000003 takes "
                           "(1.0 KiB): removed step_00000001 first, which this save would have removed "
                           "(train.keep_checkpoints=3)")
    assert len(messages) == 1 + 2 + 1


def test_incompatible_model_is_a_clear_error(tmp_path):
    _trained(tmp_path)
    from dataclasses import replace

    from prx.model import build_model

    cfg = tiny_config().model
    other = build_model(replace(cfg, hidden_dim=32, text_dim=384))
    with pytest.raises(CheckpointError, match="does not fit this model.*different model config"):
        load_checkpoint(tmp_path / "run", {"model": other.state_dict()})
    # resuming a run directory with another model config is refused before any work
    with pytest.raises(CheckpointError, match="different model config"):
        Trainer(tiny_config("model.hidden_dim=32"), tmp_path / "run").setup()


def test_pipeline_loads_ema_weights(tmp_path, text_encoder):
    trainer = _trained(tmp_path)
    pipe = Pipeline.from_checkpoint(tmp_path / "run", text_encoder=text_encoder)
    for p, q in zip(pipe.model.parameters(), trainer.ema.model.parameters()):
        assert torch.equal(p, q)
    raw = Pipeline.from_checkpoint(tmp_path / "run", weights="model", text_encoder=text_encoder)
    for p, q in zip(raw.model.parameters(), trainer.model.parameters()):
        assert torch.equal(p, q)
    images = pipe.generate(["a red circle in the top left", "a blue square"], steps=2, seed=3)
    assert images.shape == (2, 48, 48, 3) and images.dtype == torch.uint8
    assert torch.equal(images[1:], pipe.generate(["a blue square"], steps=2, seed=4))  # image i uses seed + i
