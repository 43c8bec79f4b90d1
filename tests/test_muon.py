"""Muon: torch's update, stacked and in the device's fast precision, eager and compiled; the bf16 speed probe."""


import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_model
from prx.errors import ConfigError
from prx.optim import build_optimizer


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


@pytest.mark.slow
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
