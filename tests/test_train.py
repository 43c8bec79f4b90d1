import json
import platform
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from prx.errors import CheckpointError, TrainingError
from prx.optim import lr_scale
from prx.train import Trainer


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("ema", [[], ["ema.decay=0", "ema.update_every=1"]], ids=["average", "demo-copy-when-read"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, ema):
    full = Trainer(tiny_config("train.steps=6", *ema), tmp_path / "full")
    full.run()
    part = Trainer(tiny_config("train.steps=3", *ema), tmp_path / "split")
    part.run()
    rest = Trainer(tiny_config("train.steps=6", *ema), tmp_path / "split", resume=True)
    rest.run()
    assert rest.step == 6
    for a, b in zip(_params(full.model), _params(rest.model)):
        assert torch.equal(a, b)
    for a, b in zip(_params(full.ema.model), _params(rest.ema.model)):
        assert torch.equal(a, b)
    if ema:  # decay 0: the copy read at the end is the trained weights
        for a, b in zip(_params(rest.model), _params(rest.ema.model)):
            assert torch.equal(a, b)


def test_training_reduces_the_loss(tmp_path):
    trainer = Trainer(tiny_config("train.steps=1"), tmp_path / "run")
    trainer.setup()
    first = [trainer.train_step(s).loss for s in range(3)]
    last = [trainer.train_step(s).loss for s in range(3, 40)][-3:]
    assert sum(last) / 3 < 0.5 * sum(first) / 3


def test_the_attention_kernel_follows_train_attention(tmp_path):
    """auto keeps torch's fused kernel for an fp32 eager CPU run (tiny: 9 tokens, fp32, not compiled);
    train.attention=math switches every block, and the step trains with it."""
    auto = Trainer(tiny_config("train.steps=1"), tmp_path / "auto")
    auto.setup()
    assert {b.attention for b in auto.model.blocks} == {"sdpa"}
    written = Trainer(tiny_config("train.steps=1", "train.attention=math"), tmp_path / "math")
    written.setup()
    assert {b.attention for b in written.model.blocks} == {"math"}
    assert abs(written.train_step(0).loss - auto.train_step(0).loss) < 1e-4  # the same function


def test_non_finite_losses_are_skipped_counted_and_stop_the_run(tmp_path):
    trainer = Trainer(tiny_config("optimizer.lr=1e30", "optimizer.warmup_steps=0", "optimizer.grad_clip=0",
                                  "train.max_bad_steps=2", "train.steps=20"), tmp_path / "run")
    with pytest.raises(TrainingError, match="non-finite.*train.max_bad_steps=2"):
        trainer.run()
    assert trainer.bad_steps == 3


def test_resume_requires_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        Trainer(tiny_config(), tmp_path / "empty", resume=True).setup()


def test_lr_schedule_warmup_stable_decay():
    from prx.optim import OptimizerConfig

    cfg = OptimizerConfig(warmup_steps=4)
    assert lr_scale(0, 100, cfg) == 0.25 and lr_scale(3, 100, cfg) == 1.0 and lr_scale(99, 100, cfg) == 1.0
    assert lr_scale(0, 100, OptimizerConfig(warmup_steps=0)) == 1.0
    wsd = OptimizerConfig(warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.1)
    assert lr_scale(79, 100, wsd) == 1.0
    assert lr_scale(89, 100, wsd) == pytest.approx(1.0 - 0.9 * 10 / 20)
    assert lr_scale(99, 100, wsd) == pytest.approx(0.1)  # the last step uses the floor


def run_budget_clock(seconds_per_step, budget_minutes=10.0, *overrides):
    """A 10-minute budget on a fake clock: ([(step, count set)], seconds the run took, the last count, the last line
    the clock printed)."""
    from prx.distributed import DistInfo
    from prx.lifecycle import RunClock

    cfg = tiny_config("train.steps=100000", f"train.time_budget_minutes={budget_minutes}", "optimizer.decay_fraction=0.3",
                      *overrides)
    now = [0.0]
    clock = RunClock(cfg.train, 0, steps_planned=False, now=lambda: now[0])
    counts, step, total, line = [], 0, cfg.train.steps, ""
    while step < total:
        now[0] += seconds_per_step(step)
        step += 1
        if (steps := clock.plan(step)) is not None:
            total, line = clock.fix_steps(cfg, steps, step, DistInfo())
            counts.append((step, total))
    assert cfg.train.steps == 100000  # the config is never changed: the count is the trainer's
    return counts, now[0], cfg, total, line


def test_a_time_budget_measures_the_rate_again_halfway_and_late_and_fixes_the_count_before_the_decay():
    from prx.optim import decay_start

    # The first 100 steps are slow (caches filling): the first estimate (570 steps: the count aims 5% short
    # of the budget) is pessimistic; the rate measured again over steps 162..285 sets 1,040, which fills
    # 570 s exactly, and the late measurement (steps 285..654; 654 is the last step before a run of 936
    # would decay) keeps it.
    counts, seconds, cfg, _, _ = run_budget_clock(lambda step: 1.0 if step < 100 else 0.5)
    assert counts == [(40, 570), (285, 1040), (654, 1040)] and seconds == 570
    # the LR schedule of the steps already taken is the same under each new count: the run is `train.steps=1040`
    assert all(lr_scale(s, 570, cfg.optimizer) == lr_scale(s, 1040, cfg.optimizer) for s in range(285))
    # a machine that speeds up after the halfway measurement gets the steps it can now fit (1040 steps
    # would have ended at 506 s), one that slows down fewer; neither gets a decay that should have begun
    for after_400, final in ((0.4, 1160), (0.6, 948)):
        counts, seconds, cfg, _, _ = run_budget_clock(
            lambda step: 1.0 if step < 100 else 0.5 if step < 400 else after_400)
        assert counts[-1] == (654, final) and decay_start(final, cfg.optimizer) > 654
        assert all(lr_scale(s, 1040, cfg.optimizer) == lr_scale(s, final, cfg.optimizer) for s in range(654))
        assert 0.9 * 600 < seconds <= 600
    # a machine that halves its speed before the halfway measurement: fewer steps, the count fixed there
    counts, _, cfg, _, _ = run_budget_clock(lambda step: 1.0 if step < 100 else 2.0)
    (_, first), (replan, final) = counts
    assert final < first and decay_start(final, cfg.optimizer) > replan


def test_a_budget_that_buys_fewer_steps_than_the_config_recommends_says_which_budget_would():
    lines = []
    for recommended in (0, 1000, 2000):
        _, _, _, total, line = run_budget_clock(lambda step: 0.5, 10.0, "train.time_limit_minutes=13",
                                                f"train.recommended_steps={recommended}")
        assert total == 1140  # 570 s at 0.5 s per step
        lines.append(line)
    assert "note" not in lines[0] and "note" not in lines[1]  # none stated, or the budget buys enough
    # 10 min × 2000 / 1140 = 17.5 → 18 min, and a safety net 1.3× that
    assert lines[2].endswith("\nnote: this CPU fits 1140 steps in 10 min, fewer than the 2000 this config is tuned for "
                             "(its results need them); train.time_budget_minutes=18 train.time_limit_minutes=24 would "
                             "buy them here")


@pytest.mark.slow
def test_a_time_budget_sets_the_step_count_the_schedule_ends_with_it_and_resume_keeps_it(tmp_path):
    from prx.checkpoint import checkpoint_meta

    overrides = ("train.steps=100000", "train.time_budget_minutes=0.15", "optimizer.decay_fraction=0.5",
                 "train.checkpoint_every=100000", "logging.log_every=1")
    trainer = Trainer(tiny_config(*overrides), tmp_path / "run")
    trainer.run()
    planned = trainer.planned_steps
    assert 40 <= planned < 100000 and trainer.step == planned == trainer.total_steps
    assert trainer.config.train.steps == 100000  # the config is never changed
    assert checkpoint_meta(tmp_path / "run")["planned_steps"] == planned
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and max(lrs) == pytest.approx(1e-3)  # decayed to the end
    again = Trainer(tiny_config(*overrides), tmp_path / "run")  # the same command: already complete
    again.run()
    assert again.step == planned and again.total_steps == planned


FAULTS_OF_TEN_ROUNDS = """
import resource, sys, torch
from prx.device import keep_freed_memory
import ctypes
from prx.device import M_MMAP_THRESHOLD
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:  # glibc's starting threshold, held fixed: every allocation above 128 KiB is a fresh mmap
    assert ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024)
def one_round():  # tensors of 1-8 MiB allocated, written and freed out of order, as a step's activations are
    kept = []
    for k in (1, 3, 2, 5, 4, 6, 8, 7):
        kept.append(torch.empty(k << 18).fill_(1.0))
        if k % 2:
            kept.pop(0)
    kept.clear()
one_round(); one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="keep_freed_memory sets glibc's mallopt; elsewhere it changes nothing")
def test_a_cpu_step_reuses_freed_memory_instead_of_faulting_in_new_pages():
    # Each in a process of its own: the allocator setting is the whole process's. 10 rounds of 36 MiB
    # written fault in about 92,000 pages when every one comes fresh from the OS. glibc's default moves its
    # threshold with the process's history (4,000 to 82,000 faults here), so the contrast holds it fixed.
    def faults(mode):
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_TEN_ROUNDS, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    fresh, kept = faults("fresh"), faults("keep")
    assert fresh > 50_000  # the measurement sees pages come fresh from the OS
    assert kept < fresh / 10  # kept: the pages are reused (0 on a quiet machine, 2,800 once in a busy test suite)


def test_the_step_reads_the_device_once(tmp_path, monkeypatch):
    """A GPU must not wait for its host: the step's losses and gradient norm come back in one read (`.tolist()`),
    with no `.item()` or `bool(tensor)` per loss or micro-batch (each drains the launch queue). TREAD, REPA and
    the perceptual losses on, two micro-batches, captions cached (encoding new ones reads their lengths)."""
    from prx.config import load_config

    trainer = Trainer(load_config("speedrun-tiny", ["train.micro_batch_size=2"]), tmp_path / "run")
    trainer.setup()
    trainer.text_encoder.encode(trainer.data.batch(0, *trainer.config.stage_at(0)).captions + [""])
    reads = []
    real_tolist = torch.Tensor.tolist

    def refuse(self, *args):
        raise AssertionError("a device read in the step")

    def counted_tolist(self):  # the step's own reads (the data's host tensors, e.g. caption dropout, are not the device's)
        if sys._getframe(1).f_code.co_filename.endswith("train.py"):
            reads.append(self.shape)
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    result = trainer.train_step(0)
    assert len(reads) == 1 and set(result.losses) == {"flow", "lpips", "dino", "repa"}
    assert result.loss == pytest.approx(sum(result.losses.values())) and result.grad_norm > 0


@pytest.mark.slow
def test_block_shapes_decide_static_compilation_and_the_optimizer_compiles_where_asked(tmp_path):
    """The plan applied: train.compile_shapes static compiles the blocks with the caption length dynamic, dynamo's
    recompile limit holds the run's graphs, train.compile_optimizer on compiles Muon's passes; auto on a CPU keeps
    torch's dynamic shapes and the eager optimizer."""
    import torch

    from prx.config import load_config

    trainer = Trainer(load_config("speedrun-tiny", ["train.compile=on", "train.compile_shapes=static",
                                                    "train.compile_optimizer=on"]), tmp_path / "run")
    trainer.setup()
    assert trainer.plan.compile_blocks and trainer.plan.static_shapes and trainer.plan.compile_optimizer
    assert all(b.dynamic_text_length for b in trainer.model.blocks)
    assert torch._dynamo.config.recompile_limit >= trainer.plan.recompile_limit
    assert trainer.optimizer.optimizers[0].compiled
    auto = Trainer(load_config("speedrun-tiny", ["train.compile=on"]), tmp_path / "auto")
    auto.setup()
    assert not any(b.dynamic_text_length for b in auto.model.blocks) and not auto.optimizer.optimizers[0].compiled
    trainer.close(), auto.close()
    # a training step with Muon's passes compiled updates the weights as the eager optimizer does
    updates = []
    for choice in ("off", "on"):
        run = Trainer(load_config("speedrun-tiny", [f"train.compile_optimizer={choice}"]), tmp_path / choice)
        run.setup()
        # fp32 Newton–Schulz on every CPU: at step 0 the gradients are nearly low-rank, and bf16's rounding of their
        # small directions, which the iteration amplifies, moves either path's update by half its size
        run.optimizer.optimizers[0].ns_dtype = torch.float32
        before = torch.cat([p.detach().flatten() for p in run.model.muon_params])
        run.train_step(0)
        updates.append(torch.cat([p.detach().flatten() for p in run.model.muon_params]) - before)
        run.close()
    assert updates[0].norm() > 0 and (updates[1] - updates[0]).norm() / updates[0].norm() < 1e-3


def test_teachers_compile_where_the_blocks_do_on_a_gpu_and_cuda_graphs_need_one(tmp_path):
    """train.compile_teachers: auto compiles the frozen networks only where the blocks compile on a GPU (not on this
    CPU), on compiles them anywhere; train.cuda_graphs and train.cuda_graphs_teachers on a CPU warn and train
    without."""
    from prx.config import load_config

    def frozen(trainer):
        return [trainer.perceptual.lpips, trainer.perceptual.dino, trainer.repa.teacher]

    auto = Trainer(load_config("speedrun-tiny", ["train.compile=on"]), tmp_path / "auto")
    auto.setup()
    assert all(getattr(net, "_compiled_call_impl", None) is None for net in frozen(auto))
    on = Trainer(load_config("speedrun-tiny", ["train.compile_teachers=on", "train.cuda_graphs=true",
                                               "train.cuda_graphs_teachers=true"]), tmp_path / "on")
    with pytest.warns(RuntimeWarning, match="cuda_graphs=on needs compiled blocks on a GPU"), \
            pytest.warns(RuntimeWarning, match="cuda_graphs_teachers=on needs compiled teachers on a GPU"):
        on.setup()
    assert not on.plan.cuda_graphs and not on.plan.teacher_graphs
    assert all(getattr(net, "_compiled_call_impl", None) is not None for net in frozen(on))
