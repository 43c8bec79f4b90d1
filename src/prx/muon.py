"""Muon whose Newton–Schulz orthogonalisation runs in the precision the device is fast in.

``torch.optim.Muon`` orthogonalises in bf16, always. On GPUs and on CPUs with AVX512-BF16/AMX that
is the fast path and stays as it is (torch's own code runs). On CPUs without fast bf16 matmuls (AVX2
only: 0.8 GFLOP/s in bf16 against 108 in fp32, measured) one Muon step of the 9.4M-parameter demo
model took 21 s instead of 0.2 s, so there :class:`Muon` orthogonalises in fp32: the same quintic
iteration, coefficients, momentum, Nesterov, weight decay and LR adjustment as torch's (its
``_single_tensor_muon``), the same state, only the matmuls' dtype differs. Which path a device takes
is decided by measuring a matmul in both dtypes, once per process and device type.
"""

from __future__ import annotations

import functools
import time

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
    """torch's quintic Newton–Schulz iteration (``_zeropower_via_newtonschulz``) in ``dtype``."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm ≤ 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with the orthogonalisation in ``ns_dtype`` (None: the parameters'
    device decides, see :func:`fast_matmul_dtype`). In bf16 it is torch's own step."""

    def __init__(self, params, ns_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(params, **kwargs)
        if ns_dtype is None:
            first = next((p for g in self.param_groups for p in g["params"]), None)
            ns_dtype = fast_matmul_dtype(first.device.type if first is not None else "cpu")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for param, grad, buf in zip(params, grads, buffers):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                param.mul_(1 - lr * weight_decay)
                param.add_(update.to(param.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss
