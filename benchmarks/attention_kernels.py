"""The attention kernels the PRX block could use with its text padding mask, timed side by side.

Every block's image queries attend over [text; image] keys, and the text keys past a caption's
length are padding, masked out by a boolean key mask (``prx.model.attention``). On a GPU a mask
rules out SDPA's flash kernel, so this compares, forward + backward in the step's precision:

  sdpa+mask          what the model runs today (SDPA picks its kernel: memory-efficient or cuDNN)
  sdpa+mask/<kernel> the same with one SDPA kernel forced (unsupported ones are reported as such)
  flex               FlexAttention (compiled) with a block mask built from the caption lengths
  math               the written-out softmax (``train.attention=math``)
  sdpa, no mask      flash attention over the same keys without the mask: a floor, not the same
                     function (what padding-free text keys could reach at best)

and checks each masked kernel's output against a float64 reference.

    python benchmarks/attention_kernels.py                      # the seed model's shapes at 512 and 1024 px
    python benchmarks/attention_kernels.py --batch 2 --image-tokens 64 --text-tokens 32   # a quick CPU run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def make_inputs(batch, heads, queries, text_tokens, image_tokens, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, head_dim, generator=g)
    k = torch.randn(batch, heads, text_tokens + image_tokens, head_dim, generator=g)
    v = torch.randn(batch, heads, text_tokens + image_tokens, head_dim, generator=g)
    # captions of every length up to the maximum (the model pads text to the batch's longest)
    lengths = torch.randint(1, text_tokens + 1, (batch,), generator=g)
    lengths[0] = text_tokens
    text_mask = torch.arange(text_tokens)[None, :] < lengths[:, None]
    key_mask = torch.cat([text_mask, torch.ones(batch, image_tokens, dtype=torch.bool)], dim=1)[:, None, None, :]
    q, k, v = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    return q, k, v, key_mask.to(device), lengths.to(device)


def kernels(device: torch.device, text_tokens: int, lengths: torch.Tensor, batch: int, heads: int, queries: int,
            keys: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced(backend):
        def run(q, k, v, m):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return run

    def math(q, k, v, m):
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return scores.masked_fill(~m, float("-inf")).softmax(dim=-1).to(v.dtype) @ v

    out = {"sdpa+mask": lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)}
    backends = [("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]
    if device.type == "cuda":
        backends.insert(0, ("cudnn", SDPBackend.CUDNN_ATTENTION))
    else:
        backends.insert(0, ("flash", SDPBackend.FLASH_ATTENTION))  # the CPU's flash kernel takes a mask
    for name, backend in backends:
        out[f"sdpa+mask/{name}"] = forced(backend)
    out["math"] = math
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def keep(b, h, q_idx, kv_idx):
            return (kv_idx >= text_tokens) | (kv_idx < lengths[b])

        block_mask = create_block_mask(keep, batch, None, queries, keys, device=str(device))
        flex = torch.compile(flex_attention, dynamic=False)
        out["flex"] = lambda q, k, v, m: flex(q, k, v, block_mask=block_mask)
    except Exception as e:  # an older torch, or no compiler on this machine
        out["flex"] = e
    out["sdpa, no mask (floor)"] = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_kernel(fn, q, k, v, m, device, repeats: int) -> float:
    grad = torch.randn_like(q)

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v, m).backward(grad)

    for _ in range(3):  # compile, autotune, allocator
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(label, batch, heads, queries, text_tokens, image_tokens, head_dim, dtype, device, repeats):
    q, k, v, m, lengths = make_inputs(batch, heads, queries, text_tokens, image_tokens, head_dim, dtype, device)
    with torch.no_grad():  # the definition, in float64
        ref = torch.softmax((q.double() @ k.double().transpose(-2, -1)) * head_dim ** -0.5
                            + torch.zeros_like(m, dtype=torch.float64).masked_fill(~m, float("-inf")), -1) @ v.double()
    flops = 4 * batch * heads * queries * (text_tokens + image_tokens) * head_dim * 3.5  # fwd 2 matmuls, bwd 5
    rows = []
    for name, fn in kernels(device, text_tokens, lengths, batch, heads, queries, text_tokens + image_tokens).items():
        row = {"case": label, "kernel": name}
        try:
            if isinstance(fn, Exception):
                raise fn
            with torch.no_grad():
                got = fn(q, k, v, m)
            row["rel_error"] = float((got.double() - ref).norm() / ref.norm())
            row["ms"] = 1e3 * time_kernel(fn, q, k, v, m, device, repeats)
            row["tflops"] = flops / row["ms"] / 1e9
        except Exception as e:  # an unsupported kernel for these inputs: say so and go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=16, help="the seed model: 16 heads of 64")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--image-tokens", type=int, nargs="*", default=None,
                    help="image token counts to try (default 256 and 1024: 512 and 1024 px at patch 32)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for n in args.image_tokens or [256, 1024]:
        # all image tokens query (the dense blocks), and half of them (TREAD's routed blocks)
        for queries, what in ((n, "dense"), (n // 2, "routed")):
            label = f"{n} image tokens, {what} ({queries} queries)"
            rows += run_case(label, args.batch, args.heads, queries, args.text_tokens, queries, args.head_dim,
                             dtype, device, args.repeats)
    print(f"attention forward+backward, batch {args.batch}, {args.heads} heads × {args.head_dim}, "
          f"≤{args.text_tokens} text keys (random caption lengths), {str(dtype).replace('torch.', '')}, {device}")
    case = None
    for r in rows:
        if r["case"] != case:
            case = r["case"]
            print(f"  {case}")
        if "error" in r:
            print(f"    {r['kernel']:<24} unsupported here ({r['error']})")
        else:
            print(f"    {r['kernel']:<24} {r['ms']:8.3f} ms  {r['tflops']:7.1f} TFLOP/s  rel. error "
                  f"{r['rel_error']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
