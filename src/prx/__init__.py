"""prx: train pixel-space text-to-image diffusion transformers with the PRX speedrun recipe.

    from prx import PRX, Trainer, TREADRouter, REPAAlignment, PerceptualLoss
"""

from prx.config import Config, load_config
from prx.model import PRX, PRXOutput, Route, build_model
from prx.perceptual import PerceptualLoss
from prx.pipeline import Pipeline
from prx.repa import REPAAlignment
from prx.train import Trainer
from prx.tread import TREADRouter

__all__ = ["Config", "load_config", "PRX", "PRXOutput", "Route", "build_model", "PerceptualLoss", "Pipeline",
           "REPAAlignment", "Trainer", "TREADRouter"]
__version__ = "0.1.0"
