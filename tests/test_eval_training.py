"""Held-out evaluation during training (``eval:``) and Weights & Biases logging (``logging.wandb``).

Tiny models, tiny random stand-in extractors, one torch thread (on a loaded 2-core machine two
threads made these tiny forward passes several times slower)."""

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config
from prx.cli import main
from test_metrics import write_heldout

STAND_INS = ["eval.clip_model=tiny-random-clip", "eval.dino_model=tiny-random-dinov2"]
FAST = ["train.num_threads=1"]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    return write_heldout(tmp_path_factory.mktemp("heldout") / "shards")  # 5 samples, sample 3 unreadable


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line_error(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_eval_runs_at_the_cadence_and_equals_prx_eval_data(heldout, tmp_path, capsys):
    from prx.export import latest_real_eval_results, model_card
    from prx.train import Trainer

    run = tmp_path / "run"
    metrics = ["val_loss", "fd_dinov2", "cmmd", "clip_score"]
    # tiny: 6 steps, a checkpoint every 3; eval at step 3 (in the loop) and 6 (the end of the run)
    trainer = Trainer(tiny_config(f"eval.data=[{heldout}]", "eval.every=3", "eval.num_samples=5", "eval.batch_size=2",
                                  f"eval.metrics=[{','.join(metrics)}]", *STAND_INS, *FAST), run)
    trainer.run()
    assert trainer.text_encoder._cache and not [c for c in trainer.text_encoder._cache if "thing number" in c]
    rows = [r for r in _rows(run) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in rows] == [3, 6]
    bins = ["eval/val_loss_t0.0-0.3", "eval/val_loss_t0.3-0.6", "eval/val_loss_t0.6-1.0"]
    expected = {"step", "eval/val_loss", *bins, "eval/fd_dinov2", "eval/cmmd", "eval/clip_score",
                "eval/clip_score_real_images", "eval/num_samples", "eval/seconds"}
    assert all(set(r) == expected and r["eval/num_samples"] == 4 for r in rows)  # the unreadable sample is skipped
    assert not any("eval/val_loss" in r for r in _rows(run) if "loss/total" in r)  # rows of their own

    written = {}
    for step in (3, 6):
        path = run / "eval" / f"step_{step:08d}" / "real" / "results.json"
        written[step] = json.loads(path.read_text())
        assert written[step]["step"] == step and written[step]["during_training"] is True
        assert written[step]["checkpoint"] == str(run / "checkpoints" / f"step_{step:08d}")
        assert written[step]["settings"]["resolution"] == 48 and written[step]["settings"]["evaluated"] == 4
        assert rows[step // 3 - 1]["eval/val_loss"] == written[step]["metrics"]["val_loss"]["value"]

    # The same code as `prx eval --data` on the checkpoint of that step: the same numbers, bit for bit (one
    # process on a CPU, the same EMA weights and batches, fp32: every forward pass is the same computation).
    out = tmp_path / "prx-eval"
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "step_00000003"), "--data", str(heldout),
                 "--metrics", ",".join(metrics), "--num-samples", "5", "--batch-size", "2", "--device", "cpu",
                 "--clip-model", "tiny-random-clip", "--dino-model", "tiny-random-dinov2", "--out", str(out)]) == 0
    capsys.readouterr()
    cli = json.loads((out / "results.json").read_text())
    assert cli["metrics"] == written[3]["metrics"]
    assert cli["settings"]["sampling"] == written[3]["settings"]["sampling"]

    # the model card of `prx export --format diffusers` shows the newest held-out evaluation
    latest = latest_real_eval_results(run)
    assert latest["step"] == 6
    from prx.checkpoint import checkpoint_config

    config = checkpoint_config(run / "checkpoints" / "step_00000006")
    card = model_card(config, 6, "ema", 1, [], None, ("BertModel", "BertTokenizer"), real_results=latest)
    assert "## Held-out evaluation" in card and "evaluation (`eval:`) at step 6, 4 held-out samples at 48 px" in card
    assert f"| val_loss | {written[6]['metrics']['val_loss']['value']:.5g} | 4 |  |" in card
    assert f"| fd_dinov2 | {written[6]['metrics']['fd_dinov2']['value']:.5g} | 4 | biased upwards: few samples |" in card


def test_eval_setup_errors_are_one_line_before_step_0(heldout, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    run = tmp_path / "run"
    data = f"eval.data=[{heldout}]"

    def train(*overrides):
        return ["train", "tiny", *FAST, *overrides, "--out", str(run)]

    line = _one_line_error(capsys, train(data, "eval.metrics=[val_loss,fid]", "eval.num_samples=4"),
                           "pt_inception-2015-12-05-6726825d.pth", "eval.inception_weights FILE")
    assert "--inception-weights" not in line
    _one_line_error(capsys, train(data, "eval.metrics=[cmmd]", "eval.num_samples=4",
                                          "eval.clip_model=nobody/no-such-clip"),
                    "CLIP model 'nobody/no-such-clip' is not available offline", "eval.clip_model DIR")
    _one_line_error(capsys, train(data, "eval.num_samples=6"), "eval.num_samples 6 is more than the 5 samples")
    _one_line_error(capsys, train(f"eval.data=[{tmp_path / 'nowhere'}]"), "no shards found")
    _one_line_error(capsys, train("eval.every=2"), "eval.every=2 needs held-out data: set eval.data=")
    _one_line_error(capsys, train(data, "eval.metrics=[fid,fidd]"), "eval.metrics has unknown metric 'fidd'",
                    "fid, fd_dinov2, cmmd, clip_score, val_loss")
    # wandb is an optional extra: without it, logging.wandb=true stops the run before anything else
    monkeypatch.setitem(sys.modules, "wandb", None)
    _one_line_error(capsys, train("logging.wandb=true"), "pip install wandb")
    assert not run.exists() or sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written, no step run


def test_the_eval_cadence_follows_the_checkpoints_when_only_data_is_given(heldout):
    cfg = tiny_config(f"eval.data=[{heldout}]")
    assert cfg.eval.cadence(cfg) == cfg.train.checkpoint_every == 3 and cfg.eval.metrics == ["val_loss"]
    assert tiny_config().eval.cadence(tiny_config()) == 0  # no data: off
    off = tiny_config(f"eval.data=[{heldout}]", "eval.every=0")
    assert off.eval.cadence(off) == 0


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-ID.wandb``: LevelDB-log framing, 32 KiB blocks, 7-byte
    record headers, after a 7-byte ':W&B' file header), parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, part, out = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def _written(path: Path, seconds: float = 30.0) -> Path:
    """``path`` once W&B's writer, a process of its own that may still be writing after ``wandb.finish()`` returns
    in offline mode, has left it unchanged for half a second."""
    deadline, last = time.time() + seconds, -1
    while time.time() < deadline:
        size = path.stat().st_size
        if size == last and size > 7:
            return path
        last = size
        time.sleep(0.5)
    return path


def _history(records) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_logs_scalars_grids_and_eval_and_a_resume_continues_the_run(heldout, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed: pip install wandb to run this test")
    from prx.train import Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing reaches the W&B servers
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no error reports to W&B either
    (tmp_path / "wandb-files").mkdir()
    run = tmp_path / "run"
    common = ["logging.wandb=true", "logging.wandb_project=prx-test", "logging.sample_every=2",
              "logging.sample_prompts=[a red circle,a blue square]", "logging.tensorboard=true",
              f"eval.data=[{heldout}]", "eval.num_samples=2", *FAST]
    Trainer(tiny_config("train.steps=3", *common), run).run()
    run_id = (run / "wandb_id").read_text().strip()
    Trainer(tiny_config("train.steps=6", *common), run, resume=True).run()
    assert (run / "wandb_id").read_text().strip() == run_id

    files = sorted((tmp_path / "wandb-files" / "wandb").glob("offline-run-*"))
    assert len(files) == 2 and all(f.name.endswith("-" + run_id) for f in files)  # one W&B run, twice
    first, second = (_wandb_records(_written(f / f"run-{run_id}.wandb")) for f in files)
    runs = [r.run for r in first + second if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in runs} == {run_id} and {r.project for r in runs} == {"prx-test"}
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["train"]["steps"] == 3 and config["eval"]["data"] == [str(heldout)]  # the resolved config
    history = _history(first) + _history(second)
    logged = {}
    for row in history:
        for key in row:
            logged.setdefault(key, set()).add(row["_step"])
    # tiny: log_every 2, checkpoints (and, by default, evaluations) every 3 steps and at the end
    assert logged["loss/total"] == {2, 3, 4, 6} and logged["lr"] == {2, 3, 4, 6}
    assert logged["eval/val_loss"] == {3, 6} and logged["eval/num_samples"] == {3, 6}
    assert logged["samples/_type"] == {2, 3, 4, 6}  # every 2 steps and at the end of each part
    grid = next(row for row in history if "samples/path" in row)
    assert grid["samples/_type"] == "image-file" and (files[0] / "files" / grid["samples/path"]).is_file()
    # metrics.jsonl has the same numbers; TensorBoard has the evaluations too
    rows = {(r["step"], "eval/val_loss" in r): r for r in _rows(run)}
    for row in history:
        if "eval/val_loss" in row:
            assert row["eval/val_loss"] == pytest.approx(rows[row["_step"], True]["eval/val_loss"], rel=1e-12)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in board.Scalars("eval/val_loss")] == [3, 6]
