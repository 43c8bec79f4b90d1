"""Reliability, round 2 (issue #39): a divergence never costs the good checkpoints, a damaged checkpoint is told from
one of another config and skipped, nothing is written inside a checkpoint, no file a user is handed runs code or
exhausts memory, and a missing hub id fails in seconds (issue #36). Each test states the fault and the behaviour it
expects; the docs' fault table (docs/checkpoints.md) lists them."""

import json
import math
import shutil
import struct
import sys
from pathlib import Path

import pytest

from conftest import tiny_config
from prx.checkpoint import find_checkpoint, verify_checkpoint
from prx.cli import main
from prx.divergence import Health
from prx.errors import CheckpointDamaged, CheckpointError
from prx.train import Trainer
from test_reliability import one_line_error, run_cli

QUIET = ["logging.log_every=1", "train.num_threads=1"]


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A tiny run trained to step 4 (checkpoints at 2 and 4)."""
    run = tmp_path_factory.mktemp("rel2") / "run"
    Trainer(tiny_config("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3", *QUIET), run).run()
    return run


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# ------------------------------------------------------------------------------ divergence


def test_a_divergence_keeps_the_last_good_checkpoint_names_it_and_a_lower_lr_resumes_from_it(run4, tmp_path, capsys):
    """LR 1e10 after good checkpoints: the step after the first update at that LR is non-finite. No checkpoint is
    written from then on, pruning keeps the good ones, the error names step 4 (latest points to it), and the same
    command with a sane LR resumes there and trains, with a fresh allowance of bad steps."""
    run = copy_run(run4, tmp_path / "run")
    line = one_line_error(*run_cli(capsys, "train", "tiny", "train.steps=40", "optimizer.lr=1e10",
                                   "train.checkpoint_every=3", "train.keep_checkpoints=1", "train.max_bad_steps=4",
                                   *QUIET, "--out", run)[::2],
                          "5 steps had a non-finite or blown-up loss or gradient", "since step 6",
                          f"{run / 'checkpoints' / 'step_00000004'}", "latest points to it", "lower optimizer.lr")
    assert checkpoints(run) == ["latest", "step_00000002", "step_00000004"], line
    assert (run / "checkpoints" / "latest").resolve().name == "step_00000004"
    code, out, err = run_cli(capsys, "train", "tiny", "train.steps=8", "optimizer.lr=1e-3", "train.checkpoint_every=3",
                             "train.max_bad_steps=4", *QUIET, "--out", run)
    assert code == 0 and "resuming" in out and "at step 4" in out and "done at step 8/8" in out, out + err
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-4:] == [5, 6, 7, 8] and all(math.isfinite(r["loss/total"]) for r in rows)
    assert rows[-1]["train/bad_steps"] == 0


def test_a_checkpoint_written_just_before_a_divergence_is_set_aside_and_pruning_keeps_the_confirmed_one(run4, tmp_path,
                                                                                                         capsys):
    """With a checkpoint every step and keep_checkpoints=1, the checkpoint of step 5 holds the weights the LR 1e10
    update ruined (its own step's loss was still finite): it is written, but not trusted until a sound step confirms
    it, so pruning keeps step 4; when the run stops, step 5 is set aside and latest points back to step 4."""
    run = copy_run(run4, tmp_path / "run")
    one_line_error(*run_cli(capsys, "train", "tiny", "train.steps=40", "optimizer.lr=1e10", "train.checkpoint_every=1",
                            "train.keep_checkpoints=1", "train.max_bad_steps=2", *QUIET, "--out", run)[::2],
                   "since step 6", "step_00000004", "step_00000005 was written after the last sound step",
                   ".diverged_step_00000005")
    assert checkpoints(run) == [".diverged_step_00000005", "latest", "step_00000004"]
    assert (run / "checkpoints" / "latest").resolve().name == "step_00000004"
    # a run that reaches its end (or a signal) right after bad steps writes no checkpoint of those weights either
    code, out, err = run_cli(capsys, "train", "tiny", "train.steps=7", "optimizer.lr=1e10", "train.max_bad_steps=50",
                             *QUIET, "--out", run)
    assert code == 0 and "no checkpoint is written of the weights that gave them" in out, out + err
    assert "checkpoint: none" not in out and (run / "checkpoints" / "latest").resolve().name == "step_00000004"


def test_the_bad_step_count_is_kept_by_a_plain_resume_and_reset_by_a_changed_one(run4, tmp_path):
    run = copy_run(run4, tmp_path / "run")
    state = find_checkpoint(run) / "state.json"
    values = json.loads(state.read_text())
    values["trainer"]["bad_steps"] = 21
    state.write_text(json.dumps(values))
    plain = Trainer(tiny_config("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3", *QUIET), run)
    plain.setup()
    assert plain.bad_steps == 21
    plain.close()
    changed = Trainer(tiny_config("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3",
                                  "optimizer.lr=1e-4", *QUIET), run)
    changed.setup()
    assert changed.bad_steps == 0 and changed.health.confirmed == 4 and len(changed.health.window) == 4
    changed.close()


def test_a_blown_up_but_finite_step_is_bad_judged_against_the_stage_s_recent_good_steps():
    health = Health(factor=1000)
    for step in range(12):
        assert health.judge(step, 0, True, 1.0 + 0.1 * (step % 3), 2.0) is None
    health.saved(12)
    assert health.judge(12, 0, True, 500.0, 2.0) is None and health.confirmed == 12  # a spike, not a blow-up
    health.saved(13)
    reason = health.judge(13, 0, True, 5e3, 2.0)
    assert "flow loss 5e+03 is" in reason and "train.divergence_factor=1000" in reason
    assert health.last_bad and health.streak_start == 13 and health.confirmed == 12 and health.unconfirmed == 13
    assert "gradient norm" in health.judge(14, 0, True, 1.0, 1e4)
    assert health.judge(15, 0, False, 1.0, 2.0) == "non-finite" and health.streak_start == 13
    assert health.judge(16, 0, True, 1.0, 2.0) is None and health.confirmed == 13 and not health.last_bad
    assert health.judge(17, 1, True, 5e3, 2.0) is None  # a new stage starts a new reference
    assert Health(factor=0).judge(0, 0, True, 1e30, 1e30) is None  # off: only non-finite steps are bad
    restored = Health(1000)
    restored.load_state_dict(json.loads(json.dumps(health.state_dict())))
    assert list(restored.window) == list(health.window) and restored.stage == 1


# ------------------------------------------------------------------------------ damaged, not different


def swap_a_shape(checkpoint: Path) -> str:
    """Alter the tensor file's header so one matrix reads transposed ([r, c] → [c, r]): the header keeps its length and
    still describes its bytes exactly, so only the header recorded in meta.json (or the load) can tell."""
    shard = next(checkpoint.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].decode()
    name = "ema.model.blocks.0.img_qkv.weight"
    entry = json.dumps(json.loads(header)[name]["shape"]).replace(" ", "")
    rows, cols = json.loads(entry)
    swapped = header.replace(f'"{name}":{{"dtype":"F32","shape":{entry}',
                             f'"{name}":{{"dtype":"F32","shape":[{cols},{rows}]', 1)
    assert swapped != header and len(swapped) == len(header)
    data[8:8 + n] = swapped.encode()
    shard.write_bytes(bytes(data))
    return shard.name


def test_a_damaged_checkpoint_is_named_and_every_command_takes_the_newest_intact_one(run4, tmp_path, capsys):
    run = copy_run(run4, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000004"
    shard = swap_a_shape(newest)
    with pytest.raises(CheckpointDamaged, match=f"{shard} has a header that differs from the one it was written with"):
        verify_checkpoint(newest)
    # given the run: sample, export and eval say so and use step 2; given the damaged checkpoint: one line
    code, out, err = run_cli(capsys, "sample", "--checkpoint", run, "--prompt", "x", "--steps", 1, "--out",
                             tmp_path / "s")
    assert code == 0 and "Traceback" not in err and "is damaged" in err and "using step_00000002" in err, err
    code, out, err = run_cli(capsys, "export", "--checkpoint", run, "--out", tmp_path / "m.safetensors")
    assert code == 0 and "using step_00000002" in err and "step 2" in out, out + err
    for argv in (["sample", "--checkpoint", newest, "--prompt", "x", "--out", tmp_path / "s2"],
                 ["export", "--checkpoint", newest, "--out", tmp_path / "m2.safetensors"]):
        one_line_error(*run_cli(capsys, *argv)[::2], "is damaged", shard, "differs from the one it was written with")
    lines = []
    Trainer(tiny_config("train.steps=5", "train.checkpoint_every=2", "train.keep_checkpoints=3", *QUIET), run,
            log=lines.append).run()
    assert any("resuming from step_00000002" in line for line in lines), lines
    assert (run / "checkpoints" / ".damaged_step_00000004").is_dir()


def test_tensors_that_do_not_fit_their_own_config_are_damaged_not_another_model(run4, tmp_path, capsys):
    """A checkpoint without recorded headers (older prx) whose header was altered consistently is found only when
    its tensors are read: since its own config is the model's, it is damaged (named, skipped by train and sample),
    never "written with a different model config"."""
    run = copy_run(run4, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000004"
    meta = json.loads((newest / "meta.json").read_text())
    del meta["headers"]
    (newest / "meta.json").write_text(json.dumps(meta))
    swap_a_shape(newest)
    verify_checkpoint(newest)  # passes: nothing to compare the header with
    line = one_line_error(*run_cli(capsys, "sample", "--checkpoint", newest, "--prompt", "x", "--out",
                                   tmp_path / "s")[::2], "is damaged", "do not match the model config it was written")
    assert "different model config" not in line
    code, out, err = run_cli(capsys, "sample", "--checkpoint", run, "--prompt", "x", "--steps", 1, "--out",
                             tmp_path / "s")
    assert code == 0 and "do not match the model config it was written with" in err, err
    assert "using step_00000002" in err, err
    lines = []
    trainer = Trainer(tiny_config("train.steps=5", "train.checkpoint_every=2", "train.keep_checkpoints=3", *QUIET),
                      run, log=lines.append)
    trainer.run()
    assert trainer.resume_from.step == 2 and any("kept as" in line for line in lines), lines
    assert (run / "checkpoints" / ".damaged_step_00000004").is_dir()


def test_a_checkpoint_pruned_under_a_reader_gives_way_to_the_newest_one(run4, tmp_path, monkeypatch, capsys):
    """`prx sample` on a run that is training: the checkpoint it picked is pruned before its tensors are read."""
    import prx.pipeline

    run = copy_run(run4, tmp_path / "run")
    real, calls = prx.pipeline.load_weights, []

    def pruned_first(path, model, weights="ema"):
        calls.append(Path(path).name)
        if len(calls) == 1:
            shutil.rmtree(path)  # what the trainer's pruning does meanwhile
        return real(path, model, weights)

    monkeypatch.setattr(prx.pipeline, "load_weights", pruned_first)
    code, out, err = run_cli(capsys, "sample", "--checkpoint", run, "--prompt", "x", "--steps", 1, "--out",
                             tmp_path / "s")
    assert code == 0 and calls == ["step_00000004", "step_00000002"], out + err
    assert "step_00000004 was removed while it was read" in err and (tmp_path / "s" / "0000.png").is_file()


def test_nothing_wraps_an_error_from_another_model(run4):
    """The "different model config" message stays for a model that really is another one."""
    from dataclasses import replace

    from prx.checkpoint import load_checkpoint
    from prx.model import build_model

    other = build_model(replace(tiny_config().model, hidden_dim=32, text_dim=384))
    with pytest.raises(CheckpointError, match="different model config") as info:
        load_checkpoint(run4, {"ema": {"model": other.state_dict()}}, other.config)
    assert not isinstance(info.value, CheckpointDamaged)


# ------------------------------------------------------------------------------ nothing written inside a checkpoint


def test_no_command_writes_inside_a_run_s_checkpoints(run4, tmp_path, capsys):
    run = copy_run(run4, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    before = sorted(p.name for p in ckpt.iterdir())
    for argv in (["export", "--checkpoint", run, "--out", ckpt / "extra.safetensors"],
                 ["export", "--checkpoint", run, "--format", "diffusers", "--out", run / "checkpoints" / "latest" / "d"],
                 ["sample", "--checkpoint", run, "--prompt", "x", "--out", run / "checkpoints"],
                 ["eval", "--checkpoint", run, "--out", ckpt / "eval"],
                 ["data", "shapes", "--count", 4, "--out", ckpt / "shards"],
                 ["train", "tiny", "--out", ckpt]):
        one_line_error(*run_cli(capsys, *argv)[::2], "is inside", "only prx train writes in a run's checkpoints")
    assert sorted(p.name for p in ckpt.iterdir()) == before
    verify_checkpoint(ckpt)


def test_a_killed_export_s_temporary_files_are_removed_by_the_next_export(run4, tmp_path, capsys):
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    for out in (tmp_path / "m.safetensors", tmp_path / "pipe"):
        stale = tmp_path / f".{out.name}.tmp-{dead.pid}"
        stale.mkdir() if out.suffix == "" else stale.write_bytes(b"partial")
        argv = ["export", "--checkpoint", run4, "--out", out] + (["--format", "diffusers"] if out.suffix == "" else [])
        code, out_text, err = run_cli(capsys, *argv)
        assert code == 0 and not stale.exists(), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.yaml", "pipe"]


def test_overrides_may_follow_the_options(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "tiny", "--out", tmp_path / "x", "train.steps=1", "--dry-run")
    assert code == 0 and "1 steps" in out, err
    with pytest.raises(SystemExit):  # anything else after the options is still argparse's error
        main(["train", "tiny", "--out", str(tmp_path / "x"), "bogus"])
    assert "unrecognized arguments: bogus" in capsys.readouterr().err


# ------------------------------------------------------------------------------ no code from files, offline in seconds


def evil_model_dir(source: Path, to: Path, marker: Path) -> Path:
    """A copy of a model directory whose config.json maps AutoModel to a module beside it that creates ``marker``."""
    shutil.copytree(source, to)
    config = json.loads((to / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (to / "config.json").write_text(json.dumps(config))
    (to / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    return to


def test_no_model_directory_runs_code_from_its_files(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from prx.errors import PrxError
    from prx.metrics.extractors import DinoV2Extractor
    from prx.stand_ins import stand_in_path
    from prx.teachers import VisionTeacher
    from prx.text import TextEncoder, _load_encoder, stand_in_encoder

    marker = tmp_path / "pwned"
    encoder = evil_model_dir(stand_in_encoder("tiny-random-bert"), tmp_path / "encoder", marker)
    teacher = evil_model_dir(stand_in_path("tiny-random-dinov2"), tmp_path / "teacher", marker)
    for load, what in ((lambda: TextEncoder(str(encoder)), "text encoder"),
                       (lambda: VisionTeacher.load(str(teacher)), "teacher"),
                       (lambda: DinoV2Extractor(str(teacher)), "DINOv2 model")):
        with pytest.raises(PrxError, match=f"{what} .* needs custom code: its config.json maps AutoConfig to "
                                           f"evil.EvilConfig \\(auto_map\\)"):
            load()
    # the same files as a cached hub snapshot
    hub = tmp_path / "hub"
    snapshot = hub / "models--evil--encoder" / "snapshots" / "0123456789abcdef"
    shutil.copytree(encoder, snapshot)
    (hub / "models--evil--encoder" / "refs").mkdir()
    (hub / "models--evil--encoder" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    with pytest.raises(PrxError, match="text encoder 'evil/encoder' .* needs custom code"):
        TextEncoder("evil/encoder")
    # and transformers itself is told trust_remote_code=False: it loads its own BERT, or refuses
    try:
        _load_encoder(str(encoder), "float32", True)
    except ValueError as e:
        assert "trust_remote_code" in str(e)
    assert not marker.exists()


@pytest.mark.slow
def test_a_model_directory_that_needs_code_is_one_line_with_a_terminal(tmp_path):
    """transformers asks "run the custom code? [y/N]" when there is a terminal: prx refuses before it can ask."""
    import os
    import pty
    import subprocess

    from prx.text import stand_in_encoder

    marker = tmp_path / "pwned"
    encoder = evil_model_dir(stand_in_encoder("tiny-random-bert"), tmp_path / "encoder", marker)
    primary, secondary = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "prx", "train", "tiny", f"text.encoder={encoder}", "--out",
                           str(tmp_path / "run")], stdin=secondary, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "0"})
    os.close(primary)
    os.close(secondary)
    one_line_error(proc.returncode, proc.stderr, "needs custom code", "trust_remote_code=False")
    assert not marker.exists()


def test_a_local_directory_is_never_told_to_hf_download(tmp_path):
    from prx.errors import PrxError
    from prx.teachers import VisionTeacher
    from prx.text import TextEncoder

    (tmp_path / "empty").mkdir()
    for load in (lambda: TextEncoder(str(tmp_path / "empty")), lambda: VisionTeacher.load(str(tmp_path / "empty")),
                 lambda: TextEncoder(str(tmp_path / "nowhere")), lambda: TextEncoder("./nowhere/at/all")):
        with pytest.raises(PrxError) as info:
            load()
        assert "local directory" in str(info.value) and "hf download" not in str(info.value), info.value


def test_a_missing_hub_id_is_one_line_at_once_for_encoders_teachers_and_extractors(tmp_path, monkeypatch, capsys):
    """Not in the cache: with HF_HUB_OFFLINE=1 nothing asks the network; without it, one request with a short timeout
    (here: no network) and no download attempt, for text encoders, teachers and metric extractors alike."""
    import prx.hub
    from prx.errors import PrxError
    from prx.metrics.extractors import ClipExtractor
    from prx.teachers import VisionTeacher
    from prx.text import TextEncoder

    probes = []
    monkeypatch.setattr(prx.hub, "unreachable", lambda url, timeout=3.0: probes.append(url) or "no network (test)")
    loads = ((lambda: TextEncoder("nobody/no-such-encoder"), "text encoder 'nobody/no-such-encoder'",
              "text.encoder=DIR"),
             (lambda: VisionTeacher.load("nobody/no-such-dino"), "teacher 'nobody/no-such-dino'", "repa.teacher=DIR"),
             (lambda: ClipExtractor("nobody/no-such-clip"), "CLIP model 'nobody/no-such-clip'", "--clip-model DIR"))
    for offline in ("1", "0"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        for load, what, option in loads:
            with pytest.raises(PrxError) as info:
                load()
            message = str(info.value)
            ident = what.split("'")[1]
            assert message.startswith(f"{what} is not available offline") and f"`hf download {ident}`" in message
            assert "HF_HUB_OFFLINE=1" in message and option in message and "\n" not in message
            assert ("HF_HUB_OFFLINE is set" in message) == (offline == "1"), message
    assert len(probes) == 3 and all("/api/models/nobody/" in url for url in probes)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    one_line_error(*run_cli(capsys, "train", "tiny", "text.encoder=nobody/no-such-encoder", "--out",
                            tmp_path / "run")[::2], "no network (test)", "hf download nobody/no-such-encoder")


def test_wandb_online_without_a_network_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    import prx.logger

    probes = []
    monkeypatch.setattr(prx.logger, "unreachable", lambda url, timeout=3.0: probes.append(url) or "no network (test)")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no settings file: online by default
    one_line_error(*run_cli(capsys, "train", "tiny", "logging.wandb=true", "--out", tmp_path / "run")[::2],
                   "W&B could not start", "no network (test)", "logging.wandb_mode=offline")
    assert len(probes) == 1 and not (tmp_path / "run").exists()
    prx.logger.require_wandb(tiny_config("logging.wandb=true", "logging.wandb_mode=offline").logging)
    assert len(probes) == 1  # offline: nothing to reach

# ------------------------------------------------------------------------------ configs a user is handed


def alias_bomb(levels: int = 9) -> str:
    """Nine nested levels of nine aliases: 9**9 (387 million) values once expanded, a few hundred bytes written."""
    items = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    items += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(tmp_path, capsys):
    config = tmp_path / "dup.yaml"
    config.write_text("optimizer:\n  name: adamw\n  warmup_steps: 5\ntrain:\n  steps: 2\noptimizer:\n  lr: 0.01\n")
    one_line_error(*run_cli(capsys, "train", config, "--dry-run")[::2], "key 'optimizer' appears twice",
                   "line 1 and line 6", str(config))
    config.write_text("train:\n  steps: 2\n  batch_size: 4\n  steps: 3\n")
    one_line_error(*run_cli(capsys, "train", config, "--dry-run")[::2], "key 'train.steps' appears twice",
                   "line 2 and line 4")
    config.write_text("train:\n  stages:\n    - {resolution: 48, steps: 1, batch_size: 4, steps: 2}\n")
    one_line_error(*run_cli(capsys, "train", config, "--dry-run")[::2], "key 'train.stages[0].steps' appears twice")
    # merge keys are not duplicates: an explicit key overrides a merged one, as YAML says
    from prx.config.safe_yaml import load_yaml

    assert load_yaml("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  q: 3\n", "t") == {"a": {"p": 1, "q": 2},
                                                                            "b": {"p": 1, "q": 3}}


def test_an_alias_bomb_is_one_line_before_it_is_built_wherever_yaml_is_read(run4, tmp_path, capsys):
    """In a config file, an override, a checkpoint's config.yaml and an export's metadata: refused by its expanded
    size, which is counted on the composed nodes (shared by aliases) without building anything."""
    bomb = alias_bomb()
    config = tmp_path / "bomb.yaml"
    config.write_text(f"name: {bomb}\n")
    one_line_error(*run_cli(capsys, "train", config, "--dry-run")[::2], "'name[5]' (line 1) expands to more than 100000")
    line = one_line_error(*run_cli(capsys, "train", "tiny", f"train.steps={bomb}", "--dry-run")[::2],
                          "expands to more than 100000 values through YAML aliases")
    assert len(line) < 400
    (tmp_path / "self.yaml").write_text("name: &a [1, *a]\n")
    one_line_error(*run_cli(capsys, "train", tmp_path / "self.yaml", "--dry-run")[::2], "refers to a value that "
                                                                                        "contains it")
    (tmp_path / "deep.yaml").write_text("name: " + "[" * 20000 + "]" * 20000 + "\n")
    one_line_error(*run_cli(capsys, "train", tmp_path / "deep.yaml", "--dry-run")[::2], "nests too deeply")
    # a checkpoint's config.yaml is a file a user may be handed too
    run = copy_run(run4, tmp_path / "run")
    (run / "checkpoints" / "step_00000004" / "config.yaml").write_text(f"name: {bomb}\n")
    one_line_error(*run_cli(capsys, "sample", "--checkpoint", run / "checkpoints" / "step_00000004", "--prompt", "x",
                            "--out", tmp_path / "s")[::2], "is damaged", "expands to more than 100000")
    # and the config in an export's metadata
    from safetensors.torch import load_file, save_file

    assert run_cli(capsys, "export", "--checkpoint", run4, "--out", tmp_path / "m.safetensors")[0] == 0
    save_file(load_file(str(tmp_path / "m.safetensors")), str(tmp_path / "evil.safetensors"),
              metadata={"prx_config": f"name: {bomb}\n"})
    one_line_error(*run_cli(capsys, "sample", "--checkpoint", tmp_path / "evil.safetensors", "--prompt", "x",
                            "--out", tmp_path / "s")[::2], "has a prx_config this prx cannot read", "expands to more")


def test_error_messages_quote_a_short_repr_of_a_value(tmp_path, capsys):
    config = tmp_path / "long.yaml"
    config.write_text("train:\n  steps: [" + ",".join(["1"] * 50000) + "]\n")
    line = one_line_error(*run_cli(capsys, "train", config, "--dry-run")[::2], "train.steps must be an integer, got "
                                                                               "[1, 1, 1, 1, 1, 1, ...]")
    assert len(line) < 200
    line = one_line_error(*run_cli(capsys, "train", "tiny", "eval.guidance=" + "x" * 100000, "--dry-run")[::2],
                          "eval.guidance must be")
    assert len(line) < 2100  # whatever a check quotes, the printed line is bounded
    from prx.config.safe_yaml import short

    nested: list = []
    for _ in range(30):
        nested = [nested] * 10  # 10**30 leaves, shared
    assert len(short(nested)) <= 80 and len(short("y" * 10**7)) <= 80

# ------------------------------------------------------------------------------ weights a user points at


def transformer_dir(tmp_path: Path) -> tuple[Path, object]:
    """A diffusers PRXTransformer2DModel directory of the tiny model (MiniLM-wide text tokens), as export writes it."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from prx.diffusers_io import WEIGHTS_NAME, diffusers_config_of, to_diffusers_state_dict
    from prx.model import build_model

    model = build_model(replace(tiny_config().model, text_dim=384))
    directory = tmp_path / "transformer"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(diffusers_config_of(model.config)))
    save_file(to_diffusers_state_dict(model.state_dict()), str(directory / WEIGHTS_NAME))
    return directory, model


def test_truncated_or_foreign_init_from_weights_are_one_line_and_nothing_outside_the_directory_is_read(tmp_path,
                                                                                                      capsys):
    from prx.diffusers_io import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, load_init_weights

    directory, model = transformer_dir(tmp_path)
    assert "initialised from" in load_init_weights(model, directory)
    weights = directory / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    one_line_error(*run_cli(capsys, "train", "tiny", f"model.init_from={directory}", "--out", tmp_path / "run")[::2],
                   f"model.init_from: {weights} cannot be read as safetensors weights", "truncated")
    # sharded: an index naming a file outside the directory, a pickle, or a file that is not safetensors
    weights.unlink()
    (tmp_path / "outside.safetensors").write_bytes(data)
    index = directory / WEIGHTS_INDEX_NAME
    for target, fragment in (("../outside.safetensors", "maps weights to '../outside.safetensors'"),
                             (str(tmp_path / "outside.safetensors"), "no paths, nothing outside"),
                             ("pytorch_model.bin", "maps weights to 'pytorch_model.bin'")):
        index.write_text(json.dumps({"weight_map": {"img_in.0.weight": target}}))
        with pytest.raises(CheckpointError, match=fragment):
            load_init_weights(model, directory)
    (directory / "shard.safetensors").write_bytes(b"PK\x03\x04 a zip file, not safetensors" * 10)
    index.write_text(json.dumps({"weight_map": {"img_in.0.weight": "shard.safetensors"}}))
    one_line_error(*run_cli(capsys, "train", "tiny", f"model.init_from={directory}", "--out", tmp_path / "run")[::2],
                   "shard.safetensors cannot be read as safetensors weights")
    index.write_text("[1, 2")
    with pytest.raises(CheckpointError, match="is not a weights index"):
        load_init_weights(model, directory)

# ------------------------------------------------------------------------------ sampling within memory


def test_sampling_sizes_steps_and_batches_are_checked_against_memory_before_allocating(run4, tmp_path, monkeypatch,
                                                                                       capsys):
    import prx.pipeline
    from prx.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(run4, device="cpu")
    s = pipe.config.sampling.with_overrides(steps=1, guidance_scale=1.0)
    room = pipe.memory_needed(2, 48, 48, s) + 1000  # two 48×48 images fit, three do not
    monkeypatch.setattr(prx.pipeline, "available_memory", lambda device: (room, "available RAM"))
    base = ["sample", "--checkpoint", run4, "--steps", 1, "--guidance-scale", 1, "--out", tmp_path / "s"]
    line = one_line_error(*run_cli(capsys, *base, "--prompt", "x", "--width", 100000, "--height", 100000)[::2],
                          "sampling one 100000×100000 image needs about", "more than the 0.0 GiB available RAM",
                          "the largest square that fits is about")
    side = int(line.split("--width ")[1].split()[0])
    assert side % 16 == 0 and pipe.memory_needed(1, side, side, s) <= room < pipe.memory_needed(1, side + 16, side + 16,
                                                                                                 s)
    one_line_error(*run_cli(capsys, *base, "--prompt", "x", "--steps", 10**12)[::2], "--steps 1000000000000 needs",
                   "for its schedule alone", "use at most")
    prompts = ["--prompt", "a", "--prompt", "b", "--prompt", "c", "--prompt", "d"]
    one_line_error(*run_cli(capsys, *base, *prompts, "--batch-size", 4, "--width", 48, "--height", 48)[::2],
                   "sampling 4 images of 48×48 together needs", "--batch-size 2 fits")
    code, out, err = run_cli(capsys, *base, *prompts, "--width", 48, "--height", 48)  # no --batch-size: what fits
    assert code == 0 and "sampling 2 at a time" in err and len(list((tmp_path / "s").glob("*.png"))) == 4, err


def test_a_long_sampling_shows_its_progress_step_by_step(run4, tmp_path, capsys):
    code, out, err = run_cli(capsys, "sample", "--checkpoint", run4, "--prompt", "x", "--steps", 60,
                             "--guidance-scale", 1, "--out", tmp_path / "s")
    assert code == 0 and "sample: 100%" in err and "60/60" in err, err


def test_blank_prompt_lines_are_skipped_and_images_keep_their_line_s_number_and_noise(run4, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n   \na green triangle\n\n")
    common = ["--checkpoint", run4, "--steps", 2, "--guidance-scale", 1]
    code, out, err = run_cli(capsys, "sample", *common, "--prompts", prompts, "--out", tmp_path / "file")
    assert code == 0 and "2 blank line(s)" in err and "(line 2, 4)" in err and "NNNN.png is line NNNN + 1" in err, err
    assert sorted(p.name for p in (tmp_path / "file").iterdir()) == ["0000.png", "0002.png", "0004.png"]
    # line 3's image is the third prompt's image of a file without blank lines: the same noise (seed + 2)
    code, out, err = run_cli(capsys, "sample", *common, "--prompt", "a red circle", "--prompt", "x", "--prompt",
                             "a blue square", "--out", tmp_path / "args")
    assert code == 0, err
    same = [np.asarray(Image.open(tmp_path / d / "0002.png")) for d in ("file", "args")]
    assert np.array_equal(*same)

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
