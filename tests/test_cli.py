import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prx.cli import main

PRX = str(Path(sys.executable).parent / "prx")
TINY = ["tiny"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "train.steps=4", "--out", str(run)]) == 0
    return run


def test_console_script_help():
    for args in ([], ["train"], ["sample"], ["eval"]):
        result = subprocess.run([PRX, *args, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage: prx" in result.stdout
    help_text = subprocess.run([PRX, "sample", "--help"], capture_output=True, text=True).stdout
    for option in ("--checkpoint", "--prompt", "--prompts", "--out", "--steps", "--guidance-scale", "--seed", "--sampler"):
        assert option in help_text


def test_train_prints_latest_last_and_resumes(trained_run, capsys):
    code, out, err = run_cli(capsys, "train", *TINY, "train.steps=4", "--out", str(trained_run))
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert last.startswith("checkpoint: ") and str(trained_run / "checkpoints" / "latest") in last
    assert (trained_run / "config.yaml").is_file()


def test_sample_writes_pngs_in_prompt_order(trained_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle in the top left\n\na blue square in the center\n")
    code, out, err = run_cli(capsys, "sample", "--checkpoint", str(trained_run), "--prompts", str(prompts),
                             "--out", str(tmp_path / "s"), "--steps", "2", "--sampler", "heun", "--seed", "1")
    assert code == 0, err
    # the blank line 2 is skipped and keeps its number: NNNN.png is the prompt of line NNNN + 1
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["0000.png", "0002.png"]
    code, out, err = run_cli(capsys, "sample", "--checkpoint", str(trained_run), "--prompt", "a green triangle",
                             "--out", str(tmp_path / "one"), "--guidance-scale", "1")
    assert code == 0 and (tmp_path / "one" / "0000.png").is_file()


def test_sample_at_any_size_and_aspect_ratio(trained_run, tmp_path, capsys):
    from PIL import Image

    # the tiny run trained on 48 px squares; sampling takes any multiple of its patch (16)
    code, out, err = run_cli(capsys, "sample", "--checkpoint", str(trained_run), "--prompt", "a red circle",
                             "--width", "96", "--height", "48", "--steps", "2", "--out", str(tmp_path / "wide"))
    assert code == 0, err
    assert Image.open(tmp_path / "wide" / "0000.png").size == (96, 48) and "96×48" in out
    # an aspect ratio picks the nearest bucket of the run's resolution: at 48 px, patch 16: 3×3 and 4×2 (tall)
    for ratio, size in (("1:2", (32, 64)), ("3:5", (32, 64)), ("1:1", (48, 48)), ("16:9", (48, 48))):
        code, out, err = run_cli(capsys, "sample", "--checkpoint", str(trained_run), "--prompt", "a red circle",
                                 "--aspect-ratio", ratio, "--steps", "1", "--out", str(tmp_path / ratio.replace(":", "x")))
        assert code == 0, err
        assert Image.open(tmp_path / ratio.replace(":", "x") / "0000.png").size == size, ratio
    for argv, fragment in (
        (["--width", "100", "--height", "48"], "--width 100 is not a positive multiple of the model's patch size 16: "
                                               "use 96 or 112"),
        (["--width", "96", "--height", "8"], "--height 8 is not a positive multiple of the model's patch size 16: use "
                                             "16"),
        (["--width", "96", "--height", "-16"], "--height -16 is not a positive multiple"),
        (["--width", "96"], "give both --width and --height"),
        (["--aspect-ratio", "wide"], "--aspect-ratio 'wide' is not an aspect ratio"),
        (["--aspect-ratio", "0:1"], "is not an aspect ratio"),
        (["--aspect-ratio", "16:9", "--width", "96", "--height", "48"], "not both"),
    ):
        assert_one_line_error(*run_cli(capsys, "sample", "--checkpoint", str(trained_run), "--prompt", "x",
                                       "--out", str(tmp_path / "bad"), *argv)[::2], fragment)


def test_eval_prints_table_and_writes_json(trained_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(trained_run), "--steps", "2", "--out", str(tmp_path / "e"))
    assert code == 0, err
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert set(results["sets"]) == {"single_held_in", "single_held_out", "two_objects", "three_objects"}
    for r in results["sets"].values():
        assert {"n", "color", "shape", "position", "count", "all_correct"} <= set(r)
    assert "all-correct" in out and "single_held_out" in out
    assert (tmp_path / "e" / "single_held_in.png").is_file()


def test_bad_inputs_are_one_line_errors(trained_run, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [1, 2\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["train", str(tmp_path / "missing.yaml")], "not found"),
        (["train", str(bad_yaml)], "not valid YAML"),
        (["train", "model.preset=huge"], "unknown model preset 'huge'"),
        (["train", "train.bogus=1"], "unknown config key 'train.bogus'"),
        (["train", *TINY, "--resume", "--out", str(tmp_path / "fresh")], "has no checkpoint"),
        (["train", *TINY, "model.hidden_dim=32", "--out", str(trained_run)], "different model config"),
        (["train", *TINY, "--out", str(a_file / "sub")], "cannot write to run directory"),
        (["sample", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o")], "does not "
                                                                                                            "exist"),
        (["sample", "--checkpoint", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")], "no complete "
                                                                                                   "checkpoint"),
        (["sample", "--checkpoint", str(trained_run), "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")], "does not exist"),
        (["sample", "--checkpoint", str(trained_run), "--prompts", str(empty), "--out", str(tmp_path / "o")], "has no prompts"),
        (["sample", "--checkpoint", str(trained_run), "--out", str(tmp_path / "o")], "no prompt given"),
        (["sample", "--checkpoint", str(trained_run), "--prompt", "x", "--out", str(a_file / "o")], "cannot write"),
    ]
    for argv, fragment in cases:
        code, out, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, fragment)


@pytest.mark.slow
def test_ctrl_c_saves_and_leaves_a_usable_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([PRX, "train", *TINY, "train.steps=100000", "train.checkpoint_every=100000", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while not (run / "config.yaml").exists() and time.time() < deadline:  # written once set-up is done
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupt" in err
    assert out.strip().splitlines()[-1].startswith("checkpoint: ")
    from prx.checkpoint import checkpoint_meta

    step = checkpoint_meta(run)["step"]
    assert step > 0
    # and the run continues from there
    assert main(["train", *TINY, f"train.steps={step + 1}", "--out", str(run)]) == 0
    assert checkpoint_meta(run)["step"] == step + 1


def test_export_samples_anywhere_and_bench_reports(trained_run, tmp_path, capsys):
    from prx.pipeline import Pipeline

    out = tmp_path / "export" / "model.safetensors"
    code, stdout, err = run_cli(capsys, "export", "--checkpoint", str(trained_run), "--out", str(out))
    assert code == 0 and out.is_file() and out.with_suffix(".yaml").is_file()
    exported = Pipeline.from_checkpoint(out, device="cpu")
    original = Pipeline.from_checkpoint(trained_run, device="cpu", text_encoder=exported.text_encoder)
    for p, q in zip(exported.model.parameters(), original.model.parameters()):
        assert torch.equal(p, q)  # the EMA weights
    code, stdout, err = run_cli(capsys, "sample", "--checkpoint", str(out), "--prompt", "a red circle",
                                "--out", str(tmp_path / "s"), "--steps", "2")
    assert code == 0 and (tmp_path / "s" / "0000.png").is_file()
    assert_one_line_error(*run_cli(capsys, "export", "--checkpoint", str(trained_run), "--out", str(tmp_path / "x.pt"))[::2],
                          "should end in .safetensors")

    code, stdout, err = run_cli(capsys, "bench", "speedrun-tiny", "--steps", "1", "--warmup", "1",
                                "--json", str(tmp_path / "bench.json"), "--profile", str(tmp_path / "profile.txt"))
    assert code == 0, err
    result = json.loads((tmp_path / "bench.json").read_text())
    profile = (tmp_path / "profile.txt").read_text()  # the ops of one more step, each phase marked
    assert "by host time" in profile and "denoiser forward" in profile and "aten::mm" in profile
    assert result["profile"]["seconds_per_step"] > 0 and "profile (" in stdout
    assert result["images_per_s"] > 0 and 0 < result["mfu"] < 1.5
    assert {"denoiser forward", "backward", "optimizer", "EMA", "perceptual forward (LPIPS + DINO)",
            "REPA forward (teacher + projector)", "data"} <= set(result["phases"])
    assert {"denoiser", "REPA teacher", "LPIPS-VGG", "DINO perceptual", "Muon Newton–Schulz"} <= set(result["flops_per_step"])
    assert "MFU" in stdout and "step time by phase" in stdout


def test_bench_times_the_step_without_phase_syncs_and_the_phases_in_more_steps(monkeypatch):
    """On a GPU the step time comes from steps without the phase timer (whose syncs training does not do) and the
    breakdown from as many more steps; each step runs once, in order, and the timed captions are cached first."""
    from prx.bench import format_bench, run_bench
    from prx.config import load_config
    from prx.train import Trainer

    real_step, ran, timer_on = Trainer.train_step, [], []

    def recording_step(self, step):
        ran.append(step)
        timer_on.append(self.timer.enabled)
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    result = run_bench(load_config("speedrun-tiny"), steps=2, warmup=1, separate_phase_pass=True)
    assert ran == [0, 1, 2, 3, 4] and timer_on == [False, False, False, True, True]
    assert result["phased_step_seconds"] > 0 and result["step_seconds"] > 0 and "other" in result["phases"]
    assert "with a sync around each phase" in format_bench(result)


def test_bench_finds_the_largest_micro_batch_that_fits(tmp_path, capsys, monkeypatch):
    """``prx bench --largest-micro-batch``: largest first, an out-of-memory step (simulated: a CPU has none to
    run out of) moves on to the next, the first that runs is the answer, and the trainer keeps working after."""
    from prx.train import Trainer

    real_step, seen = Trainer.train_step, []

    def step_that_runs_out_above_2(self, step):
        seen.append(self.micro_batch_size)
        if self.micro_batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", step_that_runs_out_above_2)
    code, stdout, err = run_cli(capsys, "bench", "speedrun-tiny", "train.micro_batch_size=1", "--largest-micro-batch",
                                "2,4,1", "--json", str(tmp_path / "mb.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "mb.json").read_text())
    assert result["largest_micro_batch"] == 2 and seen == [4, 2, 2]
    assert [(t["micro_batch"], t["fits"]) for t in result["tried"]] == [(4, False), (2, True)]
    assert "the largest micro-batch that fits is 2" in stdout
    # compiled, each candidate's blocks make graphs of their own: 3 micro-batches × (16 tokens, 8 routed), twice
    assert torch._dynamo.config.recompile_limit >= 2 * 3 * 2


@pytest.mark.slow
def test_a_write_the_disk_refuses_is_one_line_from_any_command(trained_run, tmp_path):
    """Files past a size limit (as a full disk or a quota refuses them): ``prx data convert`` (pyarrow's OSError)
    and ``prx export --format diffusers`` (safetensors' own error type) end in one line naming where and why and
    how to go on, not in a traceback."""
    from conftest import files_of_at_most
    from photos import write_photo_folder

    write_photo_folder(tmp_path / "photos")
    commands = {"shards": ["data", "convert", "--from", "folder", str(tmp_path / "photos")],
                "exported": ["export", "--checkpoint", str(trained_run), "--format", "diffusers"]}
    for out, command in commands.items():
        result = subprocess.run([PRX, *command, "--out", str(tmp_path / out)], capture_output=True, text=True,
                                timeout=300, preexec_fn=lambda: files_of_at_most(256 << 10))
        lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert lines[0].startswith(f"error: a write to {tmp_path / out}"), lines[0]
        assert "failed: File too large. Make room (or write elsewhere) and run the same command again" in lines[0]

