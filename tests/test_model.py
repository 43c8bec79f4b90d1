import pytest
import torch

from conftest import tiny_model
from prx.model import Route, apply_rope, patchify, rope_2d, unpatchify


def _inputs(b=2, h=48, w=48, length=5, text_dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, h, w, generator=g)
    t = torch.rand(b, generator=g)
    txt = torch.randn(b, length, text_dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, txt, mask


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_shapes_and_zero_init():
    model = tiny_model()
    x, t, txt, mask = _inputs()
    out = model(x, t, txt, mask)
    assert out.x0.shape == x.shape
    assert torch.equal(out.x0, torch.zeros_like(x))  # adaLN-zero + zero final layer: x0 = 0 exactly


def test_a_patch_bias_lets_the_blocks_tell_flat_greys_apart():
    """Without a bias a flat patch of grey g embeds to g·v: LayerNorm gives one token for every grey."""
    import torch.nn.functional as F

    def normalised_tokens(model):
        pixels = torch.ones(3 * model.config.patch_size ** 2)
        tokens = [model.img_in(g * pixels) for g in (0.76, 0.92)]  # greys 225 and 245 in [-1, 1]
        return [F.layer_norm(t, t.shape) for t in tokens]

    with torch.no_grad():
        plain = normalised_tokens(tiny_model())
        biased = normalised_tokens(tiny_model(patch_bias_std=1.0))
    assert torch.allclose(plain[0], plain[1], atol=1e-5)
    assert F.cosine_similarity(*biased, dim=0) < 0.999  # 1.0 without the bias


def test_any_size_multiple_of_patch():
    model = tiny_model()
    _randomise(model)
    x, t, txt, mask = _inputs(h=32, w=64)
    assert model(x, t, txt, mask).x0.shape == (2, 3, 32, 64)


def test_patchify_inverse():
    x = torch.randn(2, 3, 32, 48)
    tokens = patchify(x, 16)
    assert tokens.shape == (2, 6, 3 * 16 * 16)
    assert torch.equal(unpatchify(tokens, 16, 32, 48), x)
    # channel-major per patch, like F.unfold
    ref = torch.nn.functional.unfold(x, 16, stride=16).transpose(1, 2)
    assert torch.equal(tokens, ref)


def test_rope_attention_depends_on_relative_position_only():
    head_dim = 16
    cos, sin = rope_2d(8, 8, head_dim, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, head_dim, generator=g)

    def score(pq, pk):  # positions as (row, col) on the 8x8 grid
        iq, ik = pq[0] * 8 + pq[1], pk[0] * 8 + pk[1]
        rq = apply_rope(q.view(1, 1, 1, -1), cos[iq].view(1, 1, 1, -1), sin[iq].view(1, 1, 1, -1))
        rk = apply_rope(k.view(1, 1, 1, -1), cos[ik].view(1, 1, 1, -1), sin[ik].view(1, 1, 1, -1))
        return (rq * rk).sum().item()

    base = score((1, 2), (3, 5))
    assert abs(score((4, 4), (6, 7)) - base) < 1e-4  # same offset (2, 3)
    assert abs(score((0, 0), (2, 3)) - base) < 1e-4
    assert abs(score((1, 2), (3, 6)) - base) > 1e-3  # different offset


def test_text_padding_is_masked():
    model = tiny_model()
    _randomise(model)
    x, t, txt, mask = _inputs()
    out = model(x, t, txt, mask).x0
    txt2 = txt.clone()
    txt2[0, 3:] = 1000.0  # padding positions of sample 0
    assert torch.allclose(model(x, t, txt2, mask).x0, out, atol=1e-4, rtol=1e-4)
    txt3 = txt.clone()
    txt3[0, 0] += 1.0  # a real token
    assert not torch.allclose(model(x, t, txt3, mask).x0[0], out[0], atol=1e-4)


@pytest.mark.parametrize("multiple, rows", [(1, 3 + 1 + 5), (4, 12)])
def test_on_a_cpu_only_the_real_text_tokens_are_projected_and_the_model_is_the_same(monkeypatch, multiple, rows):
    """packs_text: the text projection and every block's K/V run over the real tokens only (rounded up with
    padding rows to a multiple of PACKED_ROWS_MULTIPLE), then the K/V go back to the padded layout; x0 and
    every gradient are the padded model's, on a non-square grid, routed, with captions of 1, 3 and 5 real tokens."""
    import prx.model

    monkeypatch.setattr(prx.model, "PACKED_ROWS_MULTIPLE", multiple)
    model = tiny_model()
    _randomise(model)
    x, t, txt, mask = _inputs(b=3, h=48, w=80)  # a 3×5 grid
    mask[1, 1:] = False
    route = Route(1, 2, torch.tensor([[0, 2, 4, 6, 8], [1, 3, 5, 7, 8], [0, 1, 2, 3, 4]]))
    projected, results = [], []
    for packed in (True, False):
        monkeypatch.setattr(prx.model, "packs_text", lambda device, packed=packed: packed)
        model.zero_grad()
        projected.clear()
        hook = model.blocks[0].txt_kv.register_forward_hook(lambda m, args, out: projected.append(out.shape[0]))
        out = model(x, t, txt, mask, route=route).x0
        hook.remove()
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()], projected[0]))
    (out_packed, grads_packed, rows_packed), (out_padded, grads_padded, rows_padded) = results
    assert (rows_packed, rows_padded) == (rows, 3)  # (N, dim) rows against (B, L, dim)
    assert torch.allclose(out_packed, out_padded, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_packed, grads_padded):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_text_tokens_are_only_keys():
    # image tokens do not depend on other samples' text, and the output has image tokens only
    model = tiny_model()
    _randomise(model)
    x, t, txt, mask = _inputs()
    a = model(x[:1], t[:1], txt[:1], mask[:1]).x0
    b = model(x, t, txt, mask).x0[:1]
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_param_split_covers_everything_once():
    model = tiny_model()
    muon, adam = model.muon_params, model.adam_params
    ids = [id(p) for p in muon + adam]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and names[id(p)].startswith("blocks.") for p in muon)
    assert all(not (p.ndim == 2 and names[id(p)].startswith("blocks.")) for p in adam)
    assert any(names[id(p)].startswith("img_in") for p in adam) and any("final_layer" in names[id(p)] for p in adam)


def test_route_identity_and_capture():
    model = tiny_model()  # 4 blocks
    _randomise(model)
    with torch.no_grad():  # make the last block the identity, so "after block 3" = "after the route 1..2"
        model.blocks[3].modulation.weight.zero_()
        model.blocks[3].modulation.bias.zero_()
    x, t, txt, mask = _inputs(b=2, h=48, w=48)
    n = 9
    keep = torch.stack([torch.tensor([0, 2, 4, 5, 8]), torch.tensor([1, 3, 6, 7, 8])])
    route = Route(start=1, end=2, keep=keep)
    before = model(x, t, txt, mask, capture_block=0).hidden
    routed = model(x, t, txt, mask, route=route, capture_block=3).hidden
    inside = model(x, t, txt, mask, route=route, capture_block=1).hidden
    assert inside.shape == (2, 5, model.config.hidden_dim)  # inside the route: kept tokens only
    for b in range(2):
        skipped = sorted(set(range(n)) - set(keep[b].tolist()))
        assert torch.equal(routed[b, skipped], before[b, skipped])  # skipped tokens re-enter unchanged
        assert not torch.allclose(routed[b, keep[b]], before[b, keep[b]])
    # keeping every token is the dense model
    full = Route(1, -2, torch.arange(n).expand(2, n))
    assert torch.allclose(model(x, t, txt, mask, route=full).x0, model(x, t, txt, mask).x0, atol=1e-6)


def test_flop_formula_matches_torch_flop_counter(monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import prx.model
    from prx.flops import denoiser_forward_flops

    model = tiny_model()
    x, t, txt, mask = _inputs(b=2, h=48, w=64, length=5)
    # the counter sees attention through the math backend (the fused CPU kernel is not registered)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, t, txt, mask)
    expected = denoiser_forward_flops(model.config, 48, 64, text_tokens=5, batch=2)
    assert abs(counter.get_total_flops() - expected) / expected < 0.02
    # packed text (packs_text): the projections count the rows they ran over, 3 + 5 of the 2 × 5 tokens
    monkeypatch.setattr(prx.model, "PACKED_ROWS_MULTIPLE", 1)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, t, txt, mask)
    packed = denoiser_forward_flops(model.config, 48, 64, text_tokens=5, batch=2, projected_text_tokens=8 / 2)
    assert packed < expected and abs(counter.get_total_flops() - packed) / packed < 0.02


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny_model()
    _randomise(model)
    x, t, txt, mask = _inputs()
    route = Route(1, 2, torch.tensor([[0, 2, 4, 6, 8], [1, 3, 5, 7, 8]]))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(x, t, txt, mask, route=route).x0.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_keeps_the_qk_norms_fused_and_their_fp32_values():
    """Under bf16 autocast the QK RMSNorms get bf16 inputs: their weights follow the input's dtype (no
    "Mismatch dtype" warning, the fused kernel), and in fp32 the block computes exactly nn.RMSNorm."""
    import warnings

    from prx.model import rms_norm

    model = tiny_model()
    _randomise(model)
    x, t, txt, mask = _inputs()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Mismatch dtype")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, txt, mask).x0
        out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.blocks[0].q_norm.parameters())
    norm = model.blocks[0].k_norm
    v = torch.randn(2, 4, 9, norm.normalized_shape[0])
    assert torch.equal(rms_norm(norm, v), norm(v))


def test_written_out_attention_is_sdpa_with_its_gradients():
    """``train.attention: math`` computes the same function as torch's fused kernel: a model switched to
    it gives the same x0 and gradients (fp32) with text padding masked, on a non-square token grid, routed."""
    model = tiny_model()
    _randomise(model)
    x, t, txt, mask = _inputs(h=48, w=80)  # a 3×5 grid
    route = Route(1, 2, torch.tensor([[0, 2, 4, 6, 8], [1, 3, 5, 7, 8]]))
    results = []
    for kernel in ("sdpa", "math"):
        for block in model.blocks:
            block.attention = kernel
        model.zero_grad()
        out = model(x, t, txt, mask, route=route).x0
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_sdpa, grads_sdpa), (out_math, grads_math) = results
    assert torch.allclose(out_sdpa, out_math, atol=1e-4, rtol=1e-4)  # |x0| up to ~30: fp32 rounding of the kernels
    for a, b in zip(grads_sdpa, grads_math):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_written_out_attention_in_bf16_and_padding():
    """Under bf16 autocast the written-out attention stays within bf16 rounding of the fused kernel, and a
    padded text key gets no weight (changing its value changes nothing)."""
    from prx.model import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    mask[0, ..., :5] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, written = attention(q, k, v, mask, "sdpa"), attention(q, k, v, mask, "math")
    assert (fused.float() - written.float()).abs().max() < 0.05
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :5], v2[0, :, :5] = 1e3, -1e3
    assert torch.equal(attention(q, k, v, mask, "math"), attention(q, k2, v2, mask, "math"))


def test_the_compiled_gelu_is_torchs_tanh_gelu_with_its_gradient():
    """Compiled, the MLP's GELU is written as x·σ(2z) (cheaper in inductor's CPU code): the same function and
    gradient as F.gelu(approximate="tanh") within fp32 rounding, in fp32 and under bf16 autocast. The "eager"
    backend traces the function as torch.compile does (the compiled branch) without building C++ kernels."""
    import torch.nn.functional as F

    from prx.model import gelu_tanh

    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_()
    traced = torch.compile(gelu_tanh, backend="eager", fullgraph=True)
    (expected_grad,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)
    y = traced(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert not torch.equal(y, F.gelu(x, approximate="tanh"))  # the traced branch ran (it rounds differently)
    assert torch.allclose(y, F.gelu(x, approximate="tanh"), atol=2e-6, rtol=1e-6)
    assert torch.allclose(grad, expected_grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))  # eager: torch's own kernel
    xb = x.detach().bfloat16()
    yb, expected_b = traced(xb), F.gelu(xb, approximate="tanh")
    assert yb.dtype == torch.bfloat16
    assert ((yb.float() - expected_b.float()).abs() <= expected_b.float().abs() * 2**-8 + 1e-6).all()  # ≤ 1 bf16 ulp


def test_traced_blocks_give_the_eager_model_on_a_wide_grid_routed():
    """The blocks as torch.compile traces them (their GELU written as x·σ(2z)) compute the eager model: x0
    and gradients on a non-square 3×5 grid with text padding and TREAD routing, fp32. The "eager" backend
    traces without building C++ kernels; inductor runs the same traced graph."""
    model = tiny_model()
    _randomise(model)
    for block in model.blocks:
        block.attention = "math"
    x, t, txt, mask = _inputs(h=48, w=80)
    route = Route(1, 2, torch.tensor([[0, 2, 4, 6, 8], [1, 3, 5, 7, 8]]))
    results = []
    for traced in (False, True):
        if traced:
            for block in model.blocks:
                block.compile_compute(backend="eager", fullgraph=True)
        model.zero_grad()
        out = model(x, t, txt, mask, route=route).x0
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_eager, grads_eager), (out_traced, grads_traced) = results
    assert not torch.equal(out_eager, out_traced)  # the traced GELU ran (it rounds differently)
    assert torch.allclose(out_eager, out_traced, atol=1e-4, rtol=1e-4)
    for a, b in zip(grads_eager, grads_traced):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_blocks_compiled_for_static_shapes_reuse_their_graphs_for_any_caption_length():
    """train.compile_shapes static: one graph per image shape (the routed blocks' and the others'), and batches of
    other caption lengths reuse them (the length is marked dynamic); x0 is the eager model's. The "eager" backend
    traces and guards as inductor does, without building C++ kernels."""
    from torch._dynamo.utils import counters

    model = tiny_model()
    _randomise(model)
    route = Route(1, 2, torch.tensor([[0, 2, 4, 6, 8], [1, 3, 5, 7, 8]]))
    inputs = [_inputs(h=48, w=80, length=n, seed=n) for n in (5, 8, 13)]
    expected = [model(*batch, route=route).x0 for batch in inputs]
    torch._dynamo.reset()
    for block in model.blocks:
        block.dynamic_text_length = True
        block.compile_compute(backend="eager", fullgraph=True, dynamic=False)
    before = counters["stats"]["unique_graphs"]
    for batch, want in zip(inputs, expected):
        torch.testing.assert_close(model(*batch, route=route).x0, want, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] - before == 2  # 15 tokens (blocks 0, 3) and 5 routed (1, 2)
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own import
def test_the_attention_benchmark_compares_kernels_that_compute_the_masked_attention(tmp_path):
    """benchmarks/attention_kernels.py (run on the GPU): every masked kernel it times equals the float64
    definition, the unsupported ones are reported, not fatal, and the no-mask floor is not the same function."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "attention_kernels.py"
    spec = importlib.util.spec_from_file_location("attention_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "a.json"
    assert bench.main(["--batch", "2", "--heads", "2", "--text-tokens", "16", "--image-tokens", "16",
                       "--repeats", "1", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    timed = {(r["case"], r["kernel"]): r for r in rows if "ms" in r}
    assert {k for _, k in timed} >= {"sdpa+mask", "sdpa+mask/math", "math", "sdpa, no mask (floor)"}
    for (case, kernel), r in timed.items():
        if "floor" in kernel:
            assert r["rel_error"] > 1e-2  # padding keys attended: a different function
        else:
            assert r["rel_error"] < 1e-5, (case, kernel)
    assert all("ms" in r or r["error"] for r in rows)  # an unsupported kernel (FlexAttention's CPU backward) says why


@pytest.mark.slow
def test_blocks_compiled_with_dynamic_shapes_keep_their_graphs_on_every_bucket():
    """train.compile_shapes dynamic, what `auto` compiles for bucketed photos: routed calls on a tall, a square and a
    wide bucket of both stages of the speedrun (512 px, micro-batch 4; 1024 px, micro-batch 2), captions of 4
    lengths. torch's dynamic shapes made 10 graphs, past dynamo's default limit of 8, beyond which the calls it has no
    graph for run eagerly; the limit the trainer sets from the run's block shapes holds them, and x0 is the eager
    model's. The "eager" backend traces and guards as inductor does, without building C++ kernels."""
    import random

    from torch._dynamo.utils import counters

    from prx.config import load_config
    from prx.data.buckets import make_buckets
    from prx.execution import block_shapes, recompile_limit
    from prx.tread import TREADRouter

    stages = [(512, 4), (1024, 2)]
    every = {res: make_buckets(res, 32) for res, _ in stages}
    buckets = {res: [b[0], b[len(b) // 2], b[-1]] for res, b in every.items()}  # tallest, middle, widest

    def sizes(stage):  # the loader's buckets of a stage, as (width, height)
        return [(b.width, b.height) for b in buckets[stage.resolution]]

    cfg = load_config("speedrun-tiny", ["model.patch_size=32", "train.micro_batch_size=0", "train.stages=["
                                        + ", ".join(f"{{resolution: {r}, steps: 1, batch_size: {b}, tread: true}}"
                                                    for r, b in stages) + "]"])
    router = TREADRouter(0.5, 1, -2, seed=0)
    shapes = block_shapes(cfg, sizes, 1, router.num_kept)
    assert {routed for _, _, routed in shapes} == {False, True} and len(shapes) >= 8  # 3 buckets × 2 stages

    model = tiny_model(patch_size=32)
    _randomise(model)
    calls, rng = [], random.Random(0)
    for res, batch in stages:
        for bucket in buckets[res]:
            g = torch.Generator().manual_seed(len(calls))
            length = rng.choice([8, 16, 24, 32])
            mask = torch.rand(batch, length, generator=g) < 0.7
            mask[:, 0] = True
            inputs = (torch.randn(batch, 3, bucket.height, bucket.width, generator=g), torch.rand(batch, generator=g),
                      torch.randn(batch, length, 24, generator=g), mask)
            calls.append((inputs, router.route(len(calls), 0, batch, bucket.tokens(32), len(model.blocks))))
    expected = [model(*inputs, route=route).x0 for inputs, route in calls]
    torch._dynamo.reset()
    for block in model.blocks:
        block.compile_compute(backend="eager")
    before = counters["stats"]["unique_graphs"]
    limit = max(8, recompile_limit(shapes))  # as the trainer sets dynamo's default
    with torch._dynamo.config.patch(recompile_limit=limit):
        for (inputs, route), want in zip(calls, expected):
            out = model(*inputs, route=route).x0
            out.mean().backward()
            torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    graphs = counters["stats"]["unique_graphs"] - before
    assert graphs < limit, graphs  # every call had its graph: none was left eager
    torch._dynamo.reset()
