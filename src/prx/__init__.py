"""prx: train pixel-space text-to-image diffusion transformers with the PRX speedrun recipe."""

from prx.config import Config, load_config
from prx.model import PRX, PRXOutput, Route, build_model

__all__ = ["Config", "load_config", "PRX", "PRXOutput", "Route", "build_model"]
__version__ = "0.1.0"
