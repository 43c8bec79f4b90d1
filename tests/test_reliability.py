"""Runs nobody can lose or hijack (issue #13): checkpoints that run no code when opened, a lock per
run directory, stops that save, resumes with a changed config, damaged checkpoints and data, and
every sampling value checked. Each test states the fault and the behaviour it expects."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import files_of_at_most, tiny_config
from prx.checkpoint import checkpoint_meta, find_checkpoint, step_dir_name, verify_checkpoint
from prx.cli import main
from prx.errors import PrxError
from prx.train import Trainer

BIN = Path(sys.executable).parent
PRX = str(BIN / "prx")
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]
QUIET = ["logging.log_every=1", "logging.sample_every=0", "train.num_threads=1", "train.timeout_minutes=1"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *fragments):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def trajectory(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"metrics.jsonl holds a step twice: {steps}"
    return {r["step"]: r["loss/total"] for r in rows}


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A tiny run trained to step 4 (checkpoints at 2 and 4), in the new format."""
    run = tmp_path_factory.mktemp("rel") / "run"
    Trainer(tiny_config("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3"), run).run()
    return run


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


class Payload:
    """Unpickling this creates ``marker``: the proof that opening a file ran code from it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_legacy_checkpoint(trainer: Trainer, run: Path, extra: dict | None = None) -> Path:
    """What prx wrote before checkpoint format 2: DCP's default layout (a pickled .metadata; the
    step, counters, data position and optimizer param groups pickled inside the .distcp file)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(trainer.trainable, trainer.optimizer.optimizers)
    state = {"model": model_state, "optimizer": optim_state, "ema": trainer.ema.state_dict(),
             "trainer": {"step": trainer.step, "bad_steps": trainer.bad_steps}, "data": trainer.data.state_dict(),
             "rng": {"torch": torch.get_rng_state()}, **(extra or {})}
    path = run / "checkpoints" / step_dir_name(trainer.step)
    dcp.save(state, checkpoint_id=path, no_dist=True)
    trainer.run_config.save(path / "config.yaml")
    (path / "meta.json").write_text(json.dumps({"step": trainer.step, "time": time.time()}))
    os.symlink(path.name, run / "checkpoints" / "latest")
    trainer.run_config.save(run / "config.yaml")
    return path


# ------------------------------------------------------------------------------ safe loading


def test_new_checkpoints_hold_no_pickles_and_a_tampered_file_runs_no_code(run4, tmp_path, capsys):
    run = copy_run(run4, tmp_path / "run")
    ckpt = find_checkpoint(run)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.yaml", "meta.json", "shard-00001-model-00001-of-00001.safetensors", "state.json"]
    trainer_state = json.loads((ckpt / "state.json").read_text())["trainer"]
    assert trainer_state["step"] == 4 and trainer_state["bad_steps"] == 0
    marker = tmp_path / "pwned"
    import pickle

    # a pickled .metadata dropped into a new checkpoint is never read
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    code, out, err = run_cli(capsys, "sample", "--checkpoint", run, "--prompt", "a red circle", "--steps", 1,
                             "--out", tmp_path / "s")
    assert code == 0 and not marker.exists(), err
    # a pickle in place of state.json: named as damaged, not run (training falls back to step 2)
    (ckpt / "state.json").write_bytes(pickle.dumps(Payload(marker)))
    one_line_error(*run_cli(capsys, "sample", "--checkpoint", ckpt, "--prompt", "x", "--out", tmp_path / "s")[::2],
                   "is damaged: state.json is not valid JSON")
    # a tensor file altered in place (same size): its header no longer parses
    ckpt = run / "checkpoints" / "step_00000002"
    shard = ckpt / "shard-00001-model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:24] = pickle.dumps(Payload(marker))[:16]
    shard.write_bytes(bytes(data))
    one_line_error(*run_cli(capsys, "export", "--checkpoint", ckpt, "--out", tmp_path / "m.safetensors")[::2],
                   "is damaged", shard.name, "corrupt header")
    assert not marker.exists()


@pytest.mark.slow
def test_old_checkpoints_resume_exactly_and_their_pickles_run_no_code(tmp_path, capsys):
    full = Trainer(tiny_config("train.steps=5"), tmp_path / "full")
    full.run()
    part = Trainer(tiny_config("train.steps=3"), tmp_path / "new")
    part.run()
    legacy = tmp_path / "legacy"
    write_legacy_checkpoint(part, legacy)
    # sample, export and eval read an old checkpoint's tensors; training resumes it exactly
    code, out, err = run_cli(capsys, "export", "--checkpoint", legacy, "--out", tmp_path / "old.safetensors")
    assert code == 0, err
    rest = Trainer(tiny_config("train.steps=5"), copy_run(legacy, tmp_path / "resumed"))
    rest.run()
    assert rest.step == 5
    for a, b in zip(full.model.parameters(), rest.model.parameters()):
        assert torch.equal(a, b)
    assert (rest.run_dir / "checkpoints" / "step_00000005" / "state.json").is_file()  # then written in the new format

    marker = tmp_path / "pwned"
    import pickle

    # 1. a .metadata with a __reduce__ payload: refused by the allow-list unpickler, nothing runs
    evil = copy_run(legacy, tmp_path / "evil_metadata")
    (find_checkpoint(evil) / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    for argv in (["sample", "--checkpoint", evil, "--prompt", "x", "--out", tmp_path / "s"],
                 ["export", "--checkpoint", evil, "--out", tmp_path / "e.safetensors"],
                 ["eval", "--checkpoint", evil, "--steps", 1, "--out", tmp_path / "ev"],
                 ["train", "tiny", "train.steps=6", "--out", evil]):
        one_line_error(*run_cli(capsys, *argv)[::2], ".metadata", "refused without running it")
    # 2. a .distcp whose pickled values carry the payload: a step counter, and a weight stored as an object
    for name, extra in (("evil_value", {"trainer": {"step": Payload(marker), "bad_steps": 0}}),
                        ("evil_weight", {"ema": {"model": {**part.ema.model.state_dict(), "img_in.0.weight": Payload(marker)},
                                                 "num_updates": 3}})):
        run = tmp_path / name
        write_legacy_checkpoint(part, run, extra)
        code, out, err = run_cli(capsys, "train", "tiny", "train.steps=6", "--out", run)
        one_line_error(code, err, "refused without running it")
        code, out, err = run_cli(capsys, "sample", "--checkpoint", run, "--prompt", "x", "--steps", 1,
                                 "--out", tmp_path / "s2")
        if name == "evil_weight":
            one_line_error(code, err, "'ema.model.img_in.0.weight' is stored as a pickled object")
    assert not marker.exists()


# ------------------------------------------------------------------------------ lock and SIGTERM


@pytest.fixture(scope="module")
def reference_20(tmp_path_factory):
    """The uninterrupted run the stopped-and-resumed runs must reproduce."""
    run = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run([PRX, "train", "tiny", "train.steps=20", "train.checkpoint_every=1000", *QUIET, "--out", str(run)],
                   check=True, capture_output=True, timeout=300)
    return trajectory(run)


def wait_for_rows(metrics: Path, rows: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"{metrics} did not reach {rows} rows (exit code {proc.poll()})")


@pytest.mark.slow
def test_a_second_training_is_refused_and_sigterm_saves_then_resume_reproduces(reference_20, tmp_path):
    run = tmp_path / "run"
    command = [PRX, "train", "tiny", "train.steps=20", "train.checkpoint_every=1000", *QUIET, "--out", str(run)]
    # two trainings race for one run directory: one trains, the other fails at once naming the holder
    a, b = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2))
    finished = None
    deadline = time.time() + 120
    while finished is None and time.time() < deadline:
        finished = next((p for p in (a, b) if p.poll() is not None), None)
        time.sleep(0.05)
    loser, winner = (finished, b if finished is a else a)
    _, err = loser.communicate()
    lines = [line for line in err.splitlines() if line.strip()]
    assert loser.returncode == 2 and len(lines) == 1, err
    assert f"in use by another training (PID {winner.pid} on host {socket.gethostname()}" in lines[0]
    # SIGTERM (a preemption) mid-run: the step finishes, a checkpoint is written, exit code 128 + 15
    wait_for_rows(run / "metrics.jsonl", 5, winner)
    winner.send_signal(signal.SIGTERM)
    out, err = winner.communicate(timeout=60)
    assert winner.returncode == 143, err
    assert "SIGTERM: finishing this step and saving a checkpoint" in err and "Traceback" not in err
    stopped = checkpoint_meta(run)["step"]
    assert 5 <= stopped < 20 and out.strip().splitlines()[-1].endswith(step_dir_name(stopped))
    # the lock went with the process: the same command resumes, and the loss curve is the uninterrupted one
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    resumed = trajectory(run)
    assert resumed.keys() == reference_20.keys() == set(range(1, 21))
    for step in reference_20:
        assert resumed[step] == pytest.approx(reference_20[step], rel=1e-6), step


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_on_every_rank_and_resumes_exactly(reference_20, tmp_path):
    run = tmp_path / "run"
    command = [*TORCHRUN, "-m", "prx.cli", "train", "tiny", "train.steps=20", "train.checkpoint_every=1000", *QUIET,
               "--out", str(run)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(run / "metrics.jsonl", 5, job)
    job.send_signal(signal.SIGTERM)  # torchrun forwards it to every worker
    out, err = job.communicate(timeout=90)
    assert job.returncode != 0 and "SIGTERM: finishing this step" in err, err[-3000:]
    stopped = checkpoint_meta(run)["step"]
    assert 5 <= stopped < 20
    assert not any(p.name.startswith(".tmp_") for p in (run / "checkpoints").iterdir())  # every rank finished writing
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = trajectory(run)
    assert resumed.keys() == set(range(1, 21))
    for step in reference_20:  # 2 ranks (FSDP) vs 1 process: the same run up to fp32 reduction order
        assert resumed[step] == pytest.approx(reference_20[step], rel=1e-5), step


@pytest.mark.slow
def test_under_torchrun_every_rank_learns_that_the_run_directory_is_taken(tmp_path):
    from prx.lifecycle import RunLock

    held = RunLock(tmp_path / "run").acquire()  # this process trains there
    started = time.time()
    result = subprocess.run([*TORCHRUN, "-m", "prx.cli", "train", "tiny", *QUIET, "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    held.release()
    assert result.returncode != 0 and time.time() - started < 45  # no rank waits for the others to time out
    assert result.stderr.count(f"in use by another training (PID {os.getpid()} on host") == 2  # both ranks say it
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_each_stop_signal_asks_to_finish_the_step_with_its_own_exit_code():
    from prx.lifecycle import StopSignals

    for name, code in (("SIGTERM", 143), ("SIGUSR1", 138), ("SIGINT", 130)):
        with StopSignals() as stop:
            os.kill(os.getpid(), getattr(signal, name))
            time.sleep(0.01)  # the handler runs between bytecodes: training goes on until the step ends
            assert stop.received == name and stop.exit_code == code
        assert signal.getsignal(getattr(signal, name)) != stop._handle  # the previous handlers are back


def test_the_lock_is_released_by_a_killed_holder_and_is_reentrant_in_one_process(tmp_path):
    from prx.lifecycle import RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from prx.lifecycle import RunLock; "
                               f"lock = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(PrxError, match=f"PID {holder.pid} on host"):
        RunLock(tmp_path).acquire()
    holder.kill()  # a crash: the kernel releases the flock, nothing is stale
    holder.wait()
    first = RunLock(tmp_path).acquire()
    second = RunLock(tmp_path).acquire()  # the same process again (a notebook setting up twice)
    probe = [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(tmp_path / ".lock")]  # another process's view
    first.release()
    assert subprocess.run(probe, capture_output=True).returncode != 0  # still held by `second`
    second.release()
    assert subprocess.run(probe, capture_output=True).returncode == 0


# ------------------------------------------------------------------------------ resume with a changed config


def test_a_changed_lr_takes_effect_on_resume_and_is_recorded(run4, tmp_path, capsys):
    base = ["optimizer.warmup_steps=0", "optimizer.decay_fraction=0"]
    start = Trainer(tiny_config("train.steps=2", *base), tmp_path / "start")
    start.run()
    same, tenfold = copy_run(tmp_path / "start", tmp_path / "same"), copy_run(tmp_path / "start", tmp_path / "tenfold")
    lines = []
    resumed = Trainer(tiny_config("train.steps=3", "optimizer.lr=1e-2", *base), tenfold, log=lines.append)
    resumed.run()
    assert any("changed config" in line and "optimizer.lr 0.001 → 0.01" in line for line in lines), lines
    assert "lr: 0.01" in (tenfold / "config.yaml").read_text()
    assert [g["base_lr"] for g in resumed.optimizer.param_groups] == [1e-2]
    # the reference: the same first two steps, then lr × 10 for the third, in one process
    reference = Trainer(tiny_config("train.steps=3", *base), tmp_path / "reference")
    reference.setup()
    for step in range(2):
        reference.train_step(step)
    for group in reference.optimizer.param_groups:
        group["base_lr"] *= 10
    reference.train_step(2)
    unchanged = Trainer(tiny_config("train.steps=3", *base), same)
    unchanged.run()
    for a, b, c in zip(resumed.model.parameters(), reference.model.parameters(), unchanged.model.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, c) for a, c in zip(resumed.model.parameters(), unchanged.model.parameters()))
    reference.close()
    # keys a run cannot change are refused in one line before any work
    for override, fragment in (("text.max_length=20", "text.max_length cannot change in a resumed run (48 → 20)"),
                               ("train.batch_size=8", "train.batch_size cannot change in a resumed run (4 → 8)"),
                               ("data.resolution=32", "data.resolution cannot change"),
                               ("train.seed=1", "train.seed cannot change"),
                               ("optimizer.name=muon", "optimizer.name cannot change")):
        one_line_error(*run_cli(capsys, "train", "tiny", "train.steps=6", override, "--out", copy_run(
            run4, tmp_path / override.split("=")[0]))[::2], fragment)


# ------------------------------------------------------------------------------ damage


def test_a_damaged_checkpoint_is_named_and_training_falls_back_to_an_intact_one(run4, tmp_path, capsys):
    run = copy_run(run4, tmp_path / "run")
    newest = find_checkpoint(run)
    assert newest.name == "step_00000004"
    shard = next(newest.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a write cut short
    for argv in (["sample", "--checkpoint", newest, "--prompt", "x", "--out", tmp_path / "s"],
                 ["eval", "--checkpoint", newest, "--out", tmp_path / "e"]):
        one_line_error(*run_cli(capsys, *argv)[::2], "is damaged", shard.name, "truncated")
    lines = []
    trainer = Trainer(tiny_config("train.steps=5", "train.checkpoint_every=2", "train.keep_checkpoints=3"), run,
                      log=lines.append)
    trainer.run()
    assert any("is damaged" in line and "resuming from step_00000002" in line for line in lines), lines
    assert (run / "checkpoints" / ".damaged_step_00000004").is_dir() and trainer.step == 5
    assert find_checkpoint(run).name == "step_00000005"
    # a broken meta.json or config.yaml: one line from sample, eval and export given that checkpoint (given the run,
    # they take the newest intact one: test_reliability_round2.py)
    for name, content in (("meta.json", "{not json"), ("config.yaml", "model: [1, 2\n")):
        broken = find_checkpoint(copy_run(run4, tmp_path / f"broken_{name}"))
        (broken / name).write_text(content)
        for argv in (["sample", "--checkpoint", broken, "--prompt", "x", "--out", tmp_path / "s"],
                     ["eval", "--checkpoint", broken, "--out", tmp_path / "e"],
                     ["export", "--checkpoint", broken, "--out", tmp_path / "x.safetensors"]):
            one_line_error(*run_cli(capsys, *argv)[::2], "is damaged", name)


# ------------------------------------------------------------------------------ every value validated


def test_every_sampling_value_is_checked(run4, tmp_path, capsys):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("une cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    common = ["--checkpoint", run4, "--out", tmp_path / "o"]
    for argv, fragment in (
        (["--steps", 0], "--steps must be a whole number ≥ 1"),
        (["--steps", -3], "--steps must be a whole number ≥ 1"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number ≥ 0"),
        (["--guidance-scale", "inf"], "--guidance-scale must be a finite number ≥ 0"),
        (["--guidance-scale", "-1"], "--guidance-scale must be a finite number ≥ 0"),
        (["--self-guidance-scale=-inf"], "--self-guidance-scale must be a finite number ≥ 0"),
        (["--batch-size", 0], "--batch-size must be a whole number ≥ 1"),
        (["--seed", -1], "--seed must be a whole number in [0, 2**63 − 1]"),
        (["--seed", 2**63 - 1], "--seed must be a whole number in [0, 2**63 − 2]"),
    ):
        prompts = ["--prompt", "a", "--prompt", "b"] if fragment.endswith("2]") else ["--prompt", "a"]
        one_line_error(*run_cli(capsys, "sample", *common, *prompts, *argv)[::2], fragment)
    for argv in (["--steps", 0], ["--guidance-scale", "nan"], ["--seed", 2**63 - 5]):
        one_line_error(*run_cli(capsys, "eval", *common, *argv)[::2], "must be")
    for path, fragment in ((binary, "is not UTF-8 text (byte 0: NUL byte)"), (latin, "is not UTF-8 text (byte 6")):
        one_line_error(*run_cli(capsys, "sample", *common, "--prompts", path)[::2], fragment)
    # export onto an existing directory: refused, and no temporary file is left behind
    target = tmp_path / "exists.safetensors"
    target.mkdir()
    one_line_error(*run_cli(capsys, "export", "--checkpoint", run4, "--out", target)[::2], "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_impossible_sizes_fail_before_allocating(tmp_path, capsys, monkeypatch):
    started = time.time()
    line = one_line_error(*run_cli(capsys, "train", "tiny", "model.hidden_dim=1000000", "--out", tmp_path / "huge")[::2],
                          "parameters: training needs", "GiB", "use a smaller model")
    assert "has 75T parameters: training needs 1,397,011.4 GiB" in line  # 20 bytes per parameter
    assert time.time() - started < 30
    # a global batch that does not split over the ranks, before any set-up
    monkeypatch.setenv("WORLD_SIZE", "3")
    one_line_error(*run_cli(capsys, "train", "tiny", "--out", tmp_path / "split")[::2],
                   "train.batch_size=4 does not split over 3 ranks")
    assert not (tmp_path / "split").exists()


# ------------------------------------------------------------------------------ bounded sampling


def test_sampling_many_prompts_streams_batch_by_batch(run4, tmp_path, capsys, monkeypatch):
    import prx.pipeline as pipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"circle {i}\n" for i in range(160)))
    out = tmp_path / "many"
    seen, largest = [], []
    original_noise, original_batches = pipeline.initial_noise, pipeline.Pipeline.generate_batches

    def noise(n, *args, **kwargs):
        largest.append(n)
        return original_noise(n, *args, **kwargs)

    def batches(self, *args, **kwargs):
        assert self.text_encoder.cache_size == 0  # distinct prompts' encodings are not kept either
        for start, images in original_batches(self, *args, **kwargs):
            seen.append(len(list(out.glob("*.png"))))  # what is on disk when the next batch is handed over
            yield start, images

    monkeypatch.setattr(pipeline, "initial_noise", noise)
    monkeypatch.setattr(pipeline.Pipeline, "generate_batches", batches)
    code, stdout, err = run_cli(capsys, "sample", "--checkpoint", run4, "--prompts", prompts, "--steps", 1,
                                "--batch-size", 16, "--guidance-scale", 1, "--out", out)
    assert code == 0, err
    assert len(list(out.glob("*.png"))) == 160 and (out / "0159.png").is_file()
    assert seen == [16 * k for k in range(10)]  # batch k arrives when the k batches before it are written
    assert max(largest) == 16  # never more than one batch of noise (or images) at once
    assert "sample: 100%" in err  # the progress bar


# ------------------------------------------------------------------------------ damaged data


def test_a_damaged_row_group_is_skipped_counted_named_once_and_inspected(tmp_path, capsys):
    import pyarrow.parquet as pq

    from prx.data.loader import ShardLoader
    from prx.data.shapes import write_shards

    (shard,) = write_shards(tmp_path / "shards", 96, resolution=32, per_shard=96)  # 3 row groups of 32
    meta = pq.ParquetFile(shard).metadata
    column = pq.ParquetFile(shard).schema_arrow.names.index("image")
    offset = meta.row_group(1).column(column).data_page_offset
    data = bytearray(shard.read_bytes())
    data[offset:offset + 16] = bytes(b ^ 0xFF for b in data[offset:offset + 16])  # the page header of group 1
    shard.write_bytes(bytes(data))

    loader = ShardLoader([shard], patch=16, seed=0, caption_weights={}, num_workers=1)
    loader.set_stage(0, 32, 8)
    batches = [loader.next()]  # the worker is up
    worker = loader._iterator._workers[0].pid
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):  # sent to a whole job (Slurm, a terminal): the worker stays
        os.kill(worker, getattr(signal, name))
    batches += [loader.next() for _ in range(11)]  # one epoch: 96 samples in batches of 8
    assert all(b.images.shape[0] == 8 for b in batches)
    assert loader.skipped == {"damaged row group": 32}
    loader.close()
    err = capsys.readouterr().err
    assert err.count("row group 1 cannot be read") == 1 and str(shard) in err

    code, out, err = run_cli(capsys, "data", "inspect", shard, "--resolution", 32, "--patch-size", 16, "--check", "all")
    assert code == 0, err
    assert "read and decoded every sample (96): 32 failed {'damaged row group': 32}" in out
    assert f"damaged: {shard}: row group 1 cannot be read" in out


def test_a_refused_training_waits_a_moment_for_the_holder_to_write_its_pid(tmp_path):
    import json
    import threading

    from prx.lifecycle import RunLock

    path = tmp_path / ".lock"
    path.write_bytes(b"")  # the holder has the lock but has not written yet (a loaded machine)
    writer = threading.Timer(0.2, lambda: path.write_text(json.dumps({"pid": 4242, "host": "h", "since": "now"})))
    writer.start()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert RunLock._holder(fd) == "PID 4242 on host h, since now"
        path.write_bytes(b"")
        assert RunLock._holder(fd, wait_seconds=0.05) == "a process that has not written its PID yet"
    finally:
        os.close(fd)
        writer.join()


@pytest.mark.slow
def test_a_cpu_where_torch_compile_cannot_build_trains_without_compiling_and_says_why(tmp_path):
    """A C++ compiler that runs but cannot build (as one without Python's headers or OpenMP): the run trains
    eagerly after one warning per setting that asked to compile, naming the compiler's error and the fix."""
    real = shutil.which("g++") or shutil.which("c++")
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\n"
                      f'for a in "$@"; do case "$a" in --version|-v|-dumpversion|-E) exec {real} "$@";; esac; done\n'
                      "echo 'fatal error: Python.h: No such file or directory' >&2\nexit 1\n")
    broken.chmod(0o755)
    env = dict(os.environ, CXX=str(broken), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    result = subprocess.run([PRX, "train", "tiny", "train.steps=1", "train.compile=on", "train.compile_optimizer=on",
                             *QUIET, "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for setting in ("train.compile", "train.compile_optimizer"):
        assert (f"{setting}=on but torch.compile cannot build for this CPU (fatal error: Python.h: No such file or "
                f"directory): training without compiling") in result.stderr
    assert "python3-dev" in result.stderr
    assert find_checkpoint(tmp_path / "run") is not None


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_in_one_line_leaves_the_last_and_no_partial_files(tmp_path):
    """A write that fails mid-checkpoint (here a file-size limit below the checkpoint's 6.6 MiB; a full disk or a
    quota alike), in the background writer and in the synchronous one, and under torchrun: exit 2 (torchrun: 1)
    with one line from each rank that says why and which checkpoint is intact, the partial files removed (a full
    disk stays full otherwise), the previous checkpoint untouched; the same command, once it can write, resumes
    and finishes."""
    run = tmp_path / "run"

    def train(*overrides: str, launcher=(PRX,), **options):
        return subprocess.run([*launcher, "train", "tiny", "train.checkpoint_every=3", *QUIET, *overrides, "--out",
                               str(run)], capture_output=True, text=True, timeout=300, **options)

    assert train("train.steps=3").returncode == 0
    for background, launcher in (("true", (PRX,)), ("false", (PRX,)), ("true", (*TORCHRUN, "-m", "prx"))):
        failed = train("train.steps=6", f"train.async_checkpoint={background}", launcher=launcher,
                       preexec_fn=lambda: files_of_at_most(2 << 20))  # FSDP's shards: about 3.3 MiB a rank
        assert failed.returncode == (2 if launcher == (PRX,) else 1), failed.stderr[-3000:]
        errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == (1 if launcher == (PRX,) else 2), failed.stderr[-3000:]  # every rank, none waits
        for error in errors:  # each rank's line whole: one write each
            assert error.startswith("error: checkpoint step_00000006 could not be written: File too large ("), error
            assert error.endswith("its partial files are removed. step_00000003 is intact, and once the cause is "
                                  "fixed (room, a quota) the same command resumes from it"), error
        if launcher == (PRX,):
            assert "Traceback" not in failed.stderr
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000003"]
        verify_checkpoint(run / "checkpoints" / "step_00000003")
    finished = train("train.steps=6")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resuming" in finished.stdout and find_checkpoint(run).name == "step_00000006"


def test_a_step_out_of_device_memory_says_what_to_change_and_where_to_resume(tmp_path, monkeypatch, capsys):
    """torch's OutOfMemoryError in a step (raised here in step 3, as a GPU raises it): exit 2 with one line that
    says where, torch's own first line, the settings that make it fit, and the checkpoint the same command resumes
    from, which a background write finishes first."""
    real_step = Trainer.train_step

    def step_out_of_memory(self, step):
        if step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has 79 GiB in total.")
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", step_out_of_memory)
    code = main(["train", "tiny", "train.steps=6", "train.checkpoint_every=2", "train.micro_batch_size=2", *QUIET,
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "error: out of CPU memory in step 3 (48 px, micro-batch 2 per rank): CUDA out of memory. Tried to allocate "
        "2.00 GiB. To fit, lower train.micro_batch_size (gradients accumulate to the batch of 4) or set "
        "train.activation_checkpointing=true; `prx bench CONFIG --largest-micro-batch 32,16,8` tries micro-batches "
        "in turn. The same command resumes from step_00000002.")
    assert find_checkpoint(tmp_path / "run").name == "step_00000002"

