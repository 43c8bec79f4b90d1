"""Muon, stepped a group of same-shape matrices at a time, orthogonalising in the precision the device is fast in.

Same algorithm, state and hyperparameters as ``torch.optim.Muon`` (its ``_single_tensor_muon``: momentum,
Nesterov, weight decay, the quintic Newton–Schulz iteration and its coefficients, the LR adjustment), with
two changes to how the work is issued:

- **Same-shape matrices are orthogonalised together**, as one stack through batched matmuls. torch steps
  matrix by matrix: the seed model's 144 matrices (6 shapes) cost about 25 kernel launches each, ~3,600 a
  step, which left an H200 waiting on the host (the optimizer was 28% of the step, measured). Stacked, a
  step is ~25 launches per shape. Momentum and weight decay are multi-tensor (``torch._foreach_*``) ops.
  Sharded parameters (FSDP2's DTensors) go matrix by matrix, as in torch.
- **The iteration's dtype is the device's fast one.** torch orthogonalises in bf16, always. On GPUs and on
  CPUs with AVX512-BF16/AMX that is the fast path and stays. On CPUs without fast bf16 matmuls (AVX2 only:
  0.8 GFLOP/s in bf16 against 108 in fp32, measured) one step of the 9.4M-parameter demo model took 21 s
  instead of 0.2 s, so there the iteration runs in fp32. Which dtype a device gets is decided by
  measuring a matmul in both, once per process and device type.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict

import torch
from torch.optim._muon import _adjust_lr


@functools.cache
def fast_matmul_dtype(device_type: str) -> torch.dtype:
    """bf16 where bf16 matmuls are at least as fast as fp32 (GPUs, AVX512-BF16/AMX CPUs), else fp32:
    measured once per process (also what ``train.precision: auto`` trains in on a CPU)."""
    if device_type != "cpu":
        return torch.bfloat16
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(256, 256).to(dtype)
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            a @ a
            seconds.append(time.perf_counter() - start)
        rates[dtype] = 1.0 / min(seconds)
    return torch.bfloat16 if rates[torch.bfloat16] >= rates[torch.float32] else torch.float32


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch's quintic Newton–Schulz iteration (``_zeropower_via_newtonschulz``) in ``dtype``, on one matrix
    (m, n) or on a stack of same-shape matrices (k, m, n), each normalised and orthogonalised on its own."""
    a, b, c = coefficients
    addmm = torch.baddbmm if grad.ndim == 3 else torch.addmm
    x = grad.to(dtype)
    tall = grad.size(-2) > grad.size(-1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm ≤ 1
    for _ in range(steps):
        gram = x @ x.mT
        x = addmm(x, addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class Muon(torch.optim.Muon):
    """``torch.optim.Muon``'s update, with same-shape matrices orthogonalised as one stack and the
    iteration in ``ns_dtype`` (None: the parameters' device decides, see :func:`fast_matmul_dtype`)."""

    # A stack holds at most this many elements (1 GiB in fp32; the seed model's largest stack is 176M):
    # a stack's copies are transient memory, so a bigger model's stacks are split rather than grown.
    MAX_STACK_ELEMENTS = 2**28

    def __init__(self, params, ns_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(params, **kwargs)
        if ns_dtype is None:
            first = next((p for g in self.param_groups for p in g["params"]), None)
            ns_dtype = fast_matmul_dtype(first.device.type if first is not None else "cpu")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            if weight_decay:
                torch._foreach_mul_(params, 1 - lr * weight_decay)
            # matrices that can be stacked: same shape, dtype and device, not sharded
            stacks: dict[tuple, list[int]] = defaultdict(list)
            for i, param in enumerate(params):
                stacks[(tuple(param.shape), param.dtype, param.device) if not _is_sharded(param) else i].append(i)
            chunks = []
            for same in stacks.values():
                size = max(1, self.MAX_STACK_ELEMENTS // params[same[0]].numel())
                chunks += [same[k:k + size] for k in range(0, len(same), size)]
            ns = functools.partial(newton_schulz, coefficients=group["ns_coefficients"], steps=group["ns_steps"],
                                   eps=group["eps"], dtype=self.ns_dtype)
            for indices in chunks:
                step_size = -_adjust_lr(lr, group["adjust_lr_fn"], params[indices[0]].shape)
                if len(indices) == 1:
                    params[indices[0]].add_(ns(updates[indices[0]]), alpha=step_size)
                    continue
                orthogonal = ns(torch.stack([updates[i] for i in indices])).to(params[indices[0]].dtype)
                torch._foreach_add_([params[i] for i in indices], list(orthogonal.unbind(0)), alpha=step_size)
        return loss
