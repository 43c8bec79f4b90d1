"""prx: train pixel-space text-to-image diffusion transformers with the PRX speedrun recipe.

    from prx import PRX, Trainer, TREADRouter, REPAAlignment, PerceptualLoss

The names load on first use (PEP 562), so ``import prx`` and the ``prx`` command stay light:
torch is imported only by what needs it.
"""

import importlib
import os

# MKL's fp32 matmuls may sum in an order that depends on where tensors lie in memory (seen on a 2-core AMX
# CPU: a run resumed from a checkpoint differed from the uninterrupted one by 1 ulp after 4 steps). Strict
# conditional numerical reproducibility keeps resume exact; it cost nothing measurable there (361 GFLOP/s
# either way at the demo's shapes). Read by MKL at its first call; a value the user set wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

_EXPORTS = {
    "Config": "prx.config", "load_config": "prx.config",
    "PRX": "prx.model", "PRXOutput": "prx.model", "build_model": "prx.model",
    "Route": "prx.tread", "TREADRouter": "prx.tread",
    "PerceptualLoss": "prx.perceptual", "REPAAlignment": "prx.repa",
    "Pipeline": "prx.pipeline", "Trainer": "prx.train",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prx' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
