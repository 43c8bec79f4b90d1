"""Muon, stepped a group of same-shape matrices at a time, orthogonalising in the precision the device is fast in.

Same algorithm, state and hyperparameters as ``torch.optim.Muon`` (its ``_single_tensor_muon``: momentum,
Nesterov, weight decay, the quintic Newton–Schulz iteration and its coefficients, the LR adjustment), with
two changes to how the work is issued:

- **Same-shape matrices are orthogonalised together**, as one stack through batched matmuls: torch steps matrix
  by matrix, ~25 kernel launches each, which leaves a fast GPU waiting on the host. Momentum and weight decay are
  multi-tensor (``torch._foreach_*``) ops. Sharded parameters (FSDP2's DTensors) go matrix by matrix, as in torch.
- **The iteration's dtype is the device's fast one** (:func:`prx.device.fast_matmul_dtype`): bf16, as torch, on
  GPUs and CPUs with bf16 units; fp32 on CPUs without them, where a bf16 matmul is emulated ~100× slower.

With ``compiled=True`` (``train.compile_optimizer``) the memory-bound work around each stack's matmuls is one
``torch.compile``'d function before and one after (momentum, Nesterov, the stack, the cast and the normalisation;
then weight decay and the update), in place of ~10 eager passes over every matrix's fp32 values. Measurements:
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch.optim._muon import _adjust_lr

from prx.device import fast_matmul_dtype, pin_cpu_vector_isa


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch's quintic Newton–Schulz iteration (``_zeropower_via_newtonschulz``) in ``dtype``, on one matrix
    (m, n) or on a stack of same-shape matrices (k, m, n), each normalised and orthogonalised on its own."""
    tall = grad.size(-2) > grad.size(-1)
    x = _normalised(grad, dtype, tall, eps)
    x = newton_schulz_iterations(x, coefficients, steps)
    return x.mT if tall else x


def _normalised(grad: torch.Tensor, dtype: torch.dtype, tall: bool, eps: float) -> torch.Tensor:
    """The iteration's start: in ``dtype``, wide side last (the Gram matrix is then the smaller one), each
    matrix divided by its Frobenius norm (so its spectral norm is ≤ 1)."""
    x = grad.to(dtype)
    if tall:
        x = x.mT
    return x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)


def newton_schulz_iterations(x: torch.Tensor, coefficients: tuple[float, float, float], steps: int) -> torch.Tensor:
    """The quintic iteration x ← a·x + (b·G + c·G²)·x, G = x·xᵀ, on a normalised (k, m, n) or (m, n), m ≤ n."""
    a, b, c = coefficients
    addmm = torch.baddbmm if x.ndim == 3 else torch.addmm
    for _ in range(steps):
        gram = x @ x.mT
        x = addmm(x, addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def _momentum_stack(grads: list[torch.Tensor], buffers: list[torch.Tensor], momentum: float, nesterov: bool,
                    dtype: torch.dtype, tall: bool, eps: float) -> torch.Tensor:
    """torch.optim.Muon's momentum (buffers updated in place) and Nesterov step for same-shape matrices, then
    the iteration's normalised start, as one stack: compiled, one pass over the fp32 values."""
    torch._foreach_lerp_(buffers, grads, 1 - momentum)
    updates = torch._foreach_lerp(grads, buffers, momentum) if nesterov else buffers
    return _normalised(torch.stack(updates), dtype, tall, eps)


def _apply_update(params: list[torch.Tensor], orthogonal: torch.Tensor, decay: torch.Tensor,
                  step_size: torch.Tensor) -> None:
    """params ← params·decay + step_size·orthogonal (one matrix of the stack each): compiled, one pass. The
    factors are 0-d tensors, so a new learning rate each step reuses the compiled code."""
    for param, update in zip(params, orthogonal.unbind(0)):
        param.mul_(decay).add_(update.to(param.dtype) * step_size)


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class Muon(torch.optim.Muon):
    """``torch.optim.Muon``'s update, with same-shape matrices orthogonalised as one stack and the
    iteration in ``ns_dtype`` (None: the parameters' device decides, see :func:`fast_matmul_dtype`)."""

    # A stack holds at most this many elements (1 GiB in fp32; the seed model's largest stack is 176M):
    # a stack's copies are transient memory, so a bigger model's stacks are split rather than grown.
    MAX_STACK_ELEMENTS = 2**28

    def __init__(self, params, ns_dtype: torch.dtype | None = None, compiled: bool = False, **kwargs):
        super().__init__(params, **kwargs)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if ns_dtype is None:
            ns_dtype = fast_matmul_dtype(first.device.type if first is not None else "cpu")
        self.ns_dtype = ns_dtype
        self.compiled = compiled  # the memory-bound work around the matmuls compiled (see the module's docstring)
        if compiled:  # (room for their graphs in dynamo's cache: prx.execution.recompile_limit)
            if first is not None and first.device.type == "cpu":
                pin_cpu_vector_isa()  # compiled CPU code is cached by ISA only once this is set
            self._momentum_stack = torch.compile(_momentum_stack)
            self._apply_update = torch.compile(_apply_update)

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
            if self.compiled and not any(map(_is_sharded, params)):  # FSDP2's shards: the eager path
                self._step_compiled(group, params, grads, buffers)
                continue
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            if weight_decay:
                torch._foreach_mul_(params, 1 - lr * weight_decay)
            ns = functools.partial(newton_schulz, coefficients=group["ns_coefficients"], steps=group["ns_steps"],
                                   eps=group["eps"], dtype=self.ns_dtype)
            for indices in self._stacks(params):
                step_size = -_adjust_lr(lr, group["adjust_lr_fn"], params[indices[0]].shape)
                if len(indices) == 1:
                    params[indices[0]].add_(ns(updates[indices[0]]), alpha=step_size)
                    continue
                orthogonal = ns(torch.stack([updates[i] for i in indices])).to(params[indices[0]].dtype)
                torch._foreach_add_([params[i] for i in indices], list(orthogonal.unbind(0)), alpha=step_size)
        return loss

    def _stacks(self, params: list[torch.Tensor]) -> list[list[int]]:
        """Indices of matrices that go through Newton–Schulz together: same shape, dtype and device, not
        sharded, at most MAX_STACK_ELEMENTS elements a stack."""
        stacks: dict[tuple, list[int]] = defaultdict(list)
        for i, param in enumerate(params):
            stacks[(tuple(param.shape), param.dtype, param.device) if not _is_sharded(param) else i].append(i)
        chunks = []
        for same in stacks.values():
            size = max(1, self.MAX_STACK_ELEMENTS // params[same[0]].numel())
            chunks += [same[k:k + size] for k in range(0, len(same), size)]
        return chunks

    def _step_compiled(self, group: dict, params: list, grads: list, buffers: list) -> None:
        """The same update as the eager step, each stack's memory-bound work in two compiled passes."""
        lr, weight_decay = group["lr"], group["weight_decay"]
        for indices in self._stacks(params):
            first = params[indices[0]]
            tall = first.size(-2) > first.size(-1)
            x = self._momentum_stack([grads[i] for i in indices], [buffers[i] for i in indices], group["momentum"],
                                     group["nesterov"], self.ns_dtype, tall, group["eps"])
            x = newton_schulz_iterations(x, group["ns_coefficients"], group["ns_steps"])
            # 0-d tensors made on the device by a fill (no host-to-device copy, no wait)
            decay = torch.full((), 1 - lr * weight_decay, device=first.device)
            step_size = torch.full((), -_adjust_lr(lr, group["adjust_lr_fn"], first.shape), device=first.device)
            self._apply_update([params[i] for i in indices], x.mT if tall else x, decay, step_size)
