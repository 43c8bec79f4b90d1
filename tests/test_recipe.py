"""The recipe's tricks, each tested against its definition."""

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_model
from prx.errors import ConfigError, PrxError
from prx.model import Route
from prx.optim import build_optimizer
from prx.tread import TREADRouter


# ------------------------------------------------------------------------------------------ TREAD

def test_router_subsets_are_uniform_deterministic_and_per_sample():
    router = TREADRouter(route_ratio=0.5, start_block=2, end_block=-2, seed=3)
    r = router.route(step=7, first=0, count=4, num_tokens=16, num_layers=24)
    assert (r.start, r.end) == (2, 22) and r.keep.shape == (4, 8)
    assert all(len(set(row.tolist())) == 8 for row in r.keep)  # a subset, no repeats
    assert not torch.equal(r.keep[0], r.keep[1])  # each sample its own
    assert torch.equal(r.keep, router.route(7, 0, 4, 16, 24).keep)  # same step, same samples → same tokens
    assert not torch.equal(r.keep, router.route(8, 0, 4, 16, 24).keep)
    # a sample's route depends on its place in the global batch, not on which rank or micro-batch draws it
    assert torch.equal(r.keep[2:], router.route(7, 2, 2, 16, 24).keep)
    counts = torch.zeros(16)
    for step in range(400):
        counts += torch.bincount(router.route(step, 0, 4, 16, 24).keep.flatten(), minlength=16)
    assert counts.min() / counts.max() > 0.85  # every token kept about equally often
    assert TREADRouter(route_ratio=0.0).route(0, 0, 4, 16, 24) is None  # ratio 0: no routing at all


def test_router_keeps_the_rest_of_each_buckets_tokens():
    from prx.data.buckets import make_buckets

    for ratio in (0.5, 0.3, 0.75):
        router = TREADRouter(route_ratio=ratio)
        for resolution in (512, 1024):
            for bucket in make_buckets(resolution, 32):
                n = bucket.tokens(32)  # 247–264 at 512 px, odd counts included
                keep = router.route(0, 0, 2, n, 24).keep
                assert keep.shape == (2, n - round(ratio * n)) and int(keep.max()) < n  # round(ratio × n) routed


def test_router_block_ranges():
    assert TREADRouter(0.5, 2, -2).blocks(16) == (2, 14)
    with pytest.raises(ValueError, match="comes after"):
        TREADRouter(0.5, 5, 2).blocks(8)
    with pytest.raises(ConfigError, match="outside"):
        TREADRouter(0.5, 2, 9).blocks(8)


def test_routed_tokens_come_back_unchanged_through_the_router():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
        model.blocks[3].modulation.weight.zero_()  # block 3 = identity: its output is the state after the route
        model.blocks[3].modulation.bias.zero_()
    x, t = torch.randn(2, 3, 48, 48), torch.rand(2)
    txt, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    route = TREADRouter(0.5, start_block=1, end_block=-2).route(step=0, first=0, count=2, num_tokens=9, num_layers=4)
    before = model(x, t, txt, mask, capture_block=0).hidden
    after = model(x, t, txt, mask, route=route, capture_block=3).hidden
    for b in range(2):
        routed = sorted(set(range(9)) - set(route.keep[b].tolist()))
        assert torch.equal(after[b, routed], before[b, routed])


# ------------------------------------------------------------------------------------------ REPA

class StubTeacher(torch.nn.Module):
    """Returns fixed features: lets a test change what the teacher says at chosen tokens."""

    def __init__(self, features):
        super().__init__()
        self.features, self.hidden_dim, self.patch_size = features, features.shape[-1], 16

    def forward(self, images, grid, mode="bilinear"):
        return self.features


def _repa_with(features, model_dim):
    from prx.repa import REPAAlignment

    return REPAAlignment("stub", loss_weight=0.5, apply_at_block=2, projector_dim=16).setup(
        model_dim, 4, teacher=StubTeacher(features))


def test_repa_is_minus_weight_when_aligned_up_to_scale():
    features = torch.randn(2, 9, 8)
    repa = _repa_with(features, model_dim=8)
    repa.projector = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        repa.projector.weight.copy_(3.0 * torch.eye(8))  # the student says 3× what the teacher says
    loss = repa(features.clone(), torch.zeros(2, 3, 48, 48), (3, 3))
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)


def test_repa_aligns_only_visible_tokens():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    features = torch.randn(2, 9, 8)
    repa = _repa_with(features, model_dim=model.config.hidden_dim)
    x, t = torch.randn(2, 3, 48, 48), torch.rand(2)
    txt, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    keep = torch.tensor([[0, 2, 4, 6, 8], [1, 2, 3, 5, 7]])
    out = model(x, t, txt, mask, route=Route(1, 2, keep), capture_block=repa.block_index)
    assert out.hidden.shape[1] == 5 and torch.equal(out.hidden_index, keep)
    loss = repa(out.hidden, x, (3, 3), out.hidden_index)
    # what the teacher says at routed tokens does not matter; at visible tokens it does
    routed_changed = features.clone()
    routed_changed[0, [1, 3, 5, 7]] = torch.randn(4, 8)
    routed_changed[1, [0, 4, 6, 8]] = torch.randn(4, 8)
    repa.teacher.features = routed_changed
    assert repa(out.hidden, x, (3, 3), out.hidden_index).item() == pytest.approx(loss.item(), abs=1e-6)
    visible_changed = features.clone()
    visible_changed[0, 0] = torch.randn(8)
    repa.teacher.features = visible_changed
    assert repa(out.hidden, x, (3, 3), out.hidden_index).item() != pytest.approx(loss.item(), abs=1e-6)
    # and its gradient reaches the denoiser
    repa.teacher.features = features
    repa(out.hidden, x, (3, 3), out.hidden_index).backward()
    assert model.blocks[1].img_qkv.weight.grad.abs().sum() > 0


def test_real_teacher_grid_matches_token_grid():
    from prx.repa import REPAAlignment

    repa = REPAAlignment("tiny-random-dinov3", apply_at_block=2, projector_dim=16).setup(64, 4)
    assert repa.teacher.patch_size == 16
    feats = repa.teacher_features(torch.rand(2, 3, 64, 96) * 2 - 1, (4, 6))
    assert feats.shape == (2, 24, repa.teacher.hidden_dim)  # CLS and the 4 registers dropped
    assert not repa.teacher.training and not any(p.requires_grad for p in repa.teacher.parameters())


def test_missing_teacher_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    from prx.teachers import VisionTeacher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrxError) as err:
        VisionTeacher.load("dinov3")
    message = str(err.value)
    assert "facebook/dinov3-vitl16-pretrain-lvd1689m" in message and "Hugging Face cache" in message
    assert "hf download" in message and "gated" in message
    with pytest.raises(PrxError, match="local directory"):
        VisionTeacher.load(str(tmp_path))


# ------------------------------------------------------------------------------------------ perceptual

def test_vgg_trunk_has_torchvision_names():
    from prx.lpips import vgg16_features

    names = [k for k in vgg16_features().state_dict()]
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert names == [f"{i}.{w}" for i in convs for w in ("weight", "bias")]


def test_lpips_zero_for_identical_and_grows_with_distortion():
    from prx.lpips import LPIPS

    lpips = LPIPS("tiny-random-vgg16")
    assert all(h.weight.abs().sum() > 0 for h in lpips.heads)  # the real lpips heads, not zeros
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2))
    noise = torch.randn(x.shape, generator=g)
    d = [lpips(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.02, 0.1, 0.4)]
    assert 0 < d[0] < d[1] < d[2]


def test_lpips_missing_vgg_weights_is_a_clear_error(tmp_path):
    from prx.lpips import LPIPS

    with pytest.raises(PrxError, match="VGG16 ImageNet weights.*vgg16-397923af.pth"):
        LPIPS(tmp_path / "nope.pth")


def test_perceptual_loss_definitions_and_gradients():
    from prx.perceptual import PerceptualLoss

    loss = PerceptualLoss(lpips_weight=0.1, dino_weight=0.01, dino_model="tiny-random-dinov2", dino_resolution=56,
                          lpips_vgg_weights="tiny-random-vgg16").load()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    t = torch.tensor([0.2, 0.9])
    same = loss(x0.clone(), x0, t)
    assert same["lpips"].item() == 0.0 and same["dino"].item() == pytest.approx(0.0, abs=1e-6)
    pred = (x0 + 0.3 * torch.randn(x0.shape, generator=g)).requires_grad_()
    terms = loss(pred, x0, t)
    assert terms["lpips"] > 0 and terms["dino"] > 0
    sum(terms.values()).backward()  # gradients flow through the frozen networks into x̂0
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.lpips.parameters())
    # a t threshold drops the noisier samples
    gated = PerceptualLoss(0.1, 0.0, apply_at_all_noise_levels=False, t_threshold=0.5,
                           lpips_vgg_weights="tiny-random-vgg16").load()
    only_first = gated(pred, x0, t)["lpips"]
    assert only_first.item() == pytest.approx(0.1 * gated.lpips(
        torch.nn.functional.interpolate(pred[:1], size=(32, 32), mode="bilinear", antialias=True),
        torch.nn.functional.interpolate(x0[:1], size=(32, 32), mode="bilinear", antialias=True)).item(), rel=1e-4)


# ------------------------------------------------------------------------------------------ Muon

def test_muon_update_is_nearly_orthogonal_with_adam_rms():
    torch.manual_seed(0)
    m, n = 64, 256
    weight = torch.nn.Parameter(torch.zeros(m, n))
    opt = build_optimizer([{"params": [weight], "optimizer": "muon", "lr": 1.0, "momentum": 0.95, "nesterov": True,
                            "ns_steps": 5, "rms_scale": True}])
    weight.grad = torch.randn(m, n)
    opt.step()
    update = -weight.detach()
    rms = update.pow(2).mean().sqrt().item()
    assert rms == pytest.approx(0.2, rel=0.25)  # 0.2·√max(m, n) × an orthogonal matrix's RMS 1/√max(m, n)
    singular = torch.linalg.svdvals(update / (0.2 * math.sqrt(max(m, n))))
    assert singular.min() > 0.5 and singular.max() < 1.5  # quintic Newton–Schulz: ≈ U·Vᵀ


def test_muon_gives_torchs_update_stacked_and_in_fp32():
    """prx's Muon orthogonalises same-shape matrices as one stack, in bf16 (GPUs, fast-bf16 CPUs) or fp32 (CPUs
    without fast bf16): the same update as torch.optim.Muon's matrix-by-matrix bf16 step, up to bf16 rounding."""
    from prx.muon import Muon, fast_matmul_dtype

    assert fast_matmul_dtype("cpu") in (torch.float32, torch.bfloat16)  # measured on this machine
    assert fast_matmul_dtype("cuda") == torch.bfloat16
    torch.manual_seed(0)
    shapes = [(64, 192), (192, 64), (64, 192), (64, 192), (192, 64), (32, 32)]  # stacks of 3, 2 and a single one
    starts = [torch.randn(*s) * 0.02 for s in shapes]
    options = dict(lr=1.0, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    updates = {}
    for name, make in (("torch", lambda ps: torch.optim.Muon(ps, **options)),
                       ("fp32", lambda ps: Muon(ps, ns_dtype=torch.float32, **options)),
                       ("bf16", lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **options))):
        params = [torch.nn.Parameter(s.clone()) for s in starts]
        opt = make(params)
        for step in range(2):  # the second step goes through the momentum buffer
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        updates[name] = [p.detach() - s for p, s in zip(params, starts)]
    assert torch.equal(updates["bf16"][-1], updates["torch"][-1])  # a matrix alone: torch's own operations
    params = [torch.nn.Parameter(s.clone()) for s in starts]  # stacks capped at two matrices: the same update
    capped = Muon(params, ns_dtype=torch.float32, **options)
    capped.MAX_STACK_ELEMENTS = 2 * 64 * 192
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        capped.step()
    for p, s, whole in zip(params, starts, updates["fp32"]):
        torch.testing.assert_close(p.detach() - s, whole, rtol=1e-5, atol=1e-6)
    for name in ("fp32", "bf16"):
        for mine, theirs in zip(updates[name], updates["torch"]):
            rel = (mine - theirs).norm() / theirs.norm()
            assert rel < 0.03, (name, rel)  # the same update up to bf16 rounding


def test_muon_with_compiled_passes_gives_the_eager_update():
    """``train.compile_optimizer``: momentum, Nesterov, the stack, the cast and the normalisation in one compiled
    pass, weight decay and the update in another, give the eager step's update (tall, wide and lone matrices,
    a new learning rate each step without a recompile, both iteration dtypes)."""
    from prx.muon import Muon

    torch.manual_seed(0)
    shapes = [(16, 48), (16, 48), (48, 16)]  # a stack of wide matrices, a lone tall one
    starts = [torch.randn(*s) * 0.02 for s in shapes]
    # bf16: inductor rounds where eager does not (the cast before the norm), and five bf16 iterations amplify it
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        updates = {}
        for compiled in (False, True):
            params = [torch.nn.Parameter(s.clone()) for s in starts]
            opt = Muon(params, ns_dtype=dtype, compiled=compiled, lr=1.0, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
            graphs = []
            for step in range(3):
                opt.param_groups[0]["lr"] = 1.0 / (step + 1)
                gen = torch.Generator().manual_seed(step)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
                graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            updates[compiled] = [p.detach() - s for p, s in zip(params, starts)]
            assert graphs[0] == graphs[-1]  # the learning rate reaches the compiled passes as a tensor: no recompile
        for eager, fused in zip(updates[False], updates[True]):
            assert ((eager - fused).norm() / eager.norm()) < tolerance, dtype


MUON_COMPILED_VS_EAGER = textwrap.dedent("""
    import torch
    from torch._inductor import config
    from prx.muon import Muon, _momentum_stack

    Muon([torch.nn.Parameter(torch.zeros(16, 48))], compiled=True)  # a CPU optimizer's compiled passes pin the ISA
    grads = [torch.ones(16, 48).cumsum(1).sin() for _ in range(2)]
    buffers = [torch.ones(16, 48).cumsum(0).cos() for _ in range(2)]
    eager = _momentum_stack(grads, [b.clone() for b in buffers], 0.95, True, torch.float32, False, 1e-7)
    fused = torch.compile(_momentum_stack)(grads, [b.clone() for b in buffers], 0.95, True, torch.float32, False, 1e-7)
    print(config.cpp.simdlen, float((fused - eager).norm() / eager.norm()))
""")


def test_cpu_compiles_under_another_vector_isa_do_not_load_each_others_code(tmp_path):
    """torch's FX graph cache leaves inductor's vector ISA out of its key: AVX-512 code compiled, then the same
    graph under ``ATEN_CPU_CAPABILITY=avx2`` with the same cache directory, gave NaN in blocks of 8 lanes.
    prx pins ``cpp.simdlen`` before compiling on a CPU (``prx.runtime.pin_cpu_vector_isa``), which keys it.
    Where AVX2 is the widest ISA, the second process runs without vectors; both must give the eager update."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    narrower = "avx2" if pick_vec_isa().bit_width() > 256 else "default"
    widths = []
    for capability in (None, narrower):  # this process's ISA first, then a narrower one, one cache directory
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        run = subprocess.run([sys.executable, "-c", MUON_COMPILED_VS_EAGER], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        width, difference = run.stdout.split()[-2:]
        widths.append(int(width))
        assert float(difference) < 1e-5, (capability, difference)  # NaN fails too
    assert widths[0] == pick_vec_isa().bit_width() and widths[1] < widths[0]


def test_newton_schulz_on_a_stack_is_each_matrix_on_its_own():
    from prx.muon import newton_schulz

    for shape in ((4, 48, 80), (3, 80, 48)):
        stack = torch.randn(*shape)
        each = torch.stack([newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32) for g in stack])
        together = newton_schulz(stack, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
        torch.testing.assert_close(together, each, rtol=1e-5, atol=1e-5)


def test_a_cpu_without_fast_bf16_trains_and_orthogonalises_in_fp32():
    """An AVX2-only CPU, emulated on any x86 CPU by restricting MKL, torch's kernels and oneDNN to AVX2 (bf16
    matmuls there run ~130× slower than fp32): precision 'auto' and Muon both measure that and pick fp32."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("ISA restriction by environment is an x86 feature")
    code = ("import torch; from prx.muon import Muon, fast_matmul_dtype; from prx.runtime import autocast_dtype; "
            "p = torch.nn.Parameter(torch.zeros(8, 8)); "
            "print(torch.backends.cpu.get_cpu_capability(), fast_matmul_dtype('cpu'), "
            "autocast_dtype('auto', torch.device('cpu')), Muon([p], lr=0.1).ns_dtype)")
    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AVX2", "torch.float32", "None", "torch.float32"], out


def test_seed_param_groups_and_their_errors():
    model = tiny_model()
    groups = [
        {"params": model.muon_params, "optimizer": "muon", "lr": 1e-4, "momentum": 0.95, "nesterov": True,
         "ns_steps": 5, "rms_scale": True},
        {"params": model.adam_params, "optimizer": "adam", "lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8},
    ]
    opt = build_optimizer(groups)
    assert [type(o).__name__ for o in opt.optimizers] == ["Muon", "AdamW"]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="unknown keys"):
        build_optimizer([{**groups[0], "momentun": 0.9}])
    with pytest.raises(ConfigError, match="2D matrices only"):
        build_optimizer([{"params": model.adam_params, "optimizer": "muon"}])
    with pytest.raises(ConfigError, match="two param groups"):
        build_optimizer([groups[1], {**groups[1]}])


# ------------------------------------------------------------------------------------------ stages and the trainer

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


# ------------------------------------------------------------------------------------------ the seed's API

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


def test_the_seed_snippet_runs_as_written(tmp_path, prx_cache):
    from prx.teachers import TEACHER_IDS
    from prx.teachers import stand_in_path

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


# ------------------------------------------------------------------------------------------ every bucket shape

class BucketSource:
    """A data source that serves step k's batch in the k-th shape of ``shapes`` (random photos-to-be)."""

    def __init__(self, shapes, per_rank):
        self.shapes, self.per_rank, self.empty_embedding, self.skipped = shapes, per_rank, None, {}

    def batch(self, step, stage_index, stage):
        from prx.data.loader import DataBatch

        height, width = self.shapes[step]
        images = torch.randint(0, 256, (self.per_rank, 3, height, width), generator=torch.Generator().manual_seed(step),
                               dtype=torch.uint8)
        return DataBatch(images, [f"a photo number {step}-{i}" for i in range(self.per_rank)])


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


def test_repa_aligns_the_visible_tokens_of_a_non_square_grid():
    """A 12×21 bucket (252 tokens), half of them routed: the loss is −w·mean cos over the visible tokens of
    the teacher's features on that very grid — computed here from the definition."""
    from prx.repa import REPAAlignment

    model = tiny_model(patch_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    repa = REPAAlignment("tiny-random-dinov3", loss_weight=0.5, apply_at_block=2, projector_dim=16).setup(64, 4)
    x = torch.rand(2, 3, 12 * 16, 21 * 16) * 2 - 1
    route = TREADRouter(0.5, start_block=1, end_block=-2).route(step=0, first=0, count=2, num_tokens=252, num_layers=4)
    assert route.keep.shape == (2, 126)
    out = model(x, torch.rand(2), torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool), route=route,
                capture_block=repa.block_index)
    assert out.hidden.shape[:2] == (2, 126) and torch.equal(out.hidden_index, route.keep)
    loss = repa(out.hidden, x, (12, 21), out.hidden_index)
    # the definition: the teacher sees the clean image at 12·16 × 21·16 px, one feature per token of the grid
    teacher = repa.teacher.model(pixel_values=((x + 1) / 2 - repa.teacher.mean) / repa.teacher.std).last_hidden_state
    target = teacher[:, repa.teacher.num_prefix_tokens:]
    assert target.shape[1] == 252
    visible = torch.stack([target[b, route.keep[b]] for b in range(2)])
    expected = -0.5 * torch.nn.functional.cosine_similarity(repa.projector(out.hidden), visible, dim=-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dino_perceptual_keeps_the_aspect_ratio():
    from prx.teachers import aspect_grid

    assert aspect_grid(512, 512, 256) == (16, 16)
    assert aspect_grid(384, 672, 256) == (12, 21)  # a 12×21 bucket: as many patches, not squashed to 16×16
    assert aspect_grid(704, 352, 256) == (23, 11)
    seen = []

    class Spy(torch.nn.Module):
        patch_size, hidden_dim = 14, 8

        def forward(self, images, grid, mode="bilinear"):
            seen.append(grid)
            return torch.ones(images.shape[0], grid[0] * grid[1], 8)

    from prx.perceptual import PerceptualLoss

    loss = PerceptualLoss(lpips_weight=0.0, dino_weight=0.01)
    loss.dino = Spy()
    loss(torch.zeros(1, 3, 96, 168), torch.zeros(1, 3, 96, 168), torch.tensor([0.5]))
    assert seen == [(12, 21), (12, 21)]
