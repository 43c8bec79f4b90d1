"""LPIPS (Zhang et al. 2018) with a VGG16 trunk, without torchvision.

Our own VGG16 feature trunk keeps torchvision's parameter names (``features.N.weight``), so
torchvision's ``vgg16-397923af.pth`` loads as is; the five linear heads are lpips' v0.1 VGG heads
(BSD-2, shipped in ``prx/weights``; an installed ``lpips`` package's files are used when present).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from prx.errors import PrxError

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
BUNDLED_HEADS = Path(__file__).parent / "weights" / "lpips_vgg_v0.1.safetensors"
# torchvision vgg16 `features` indices: convolutions, and the ReLUs whose outputs LPIPS compares
VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=False)]
            channels = v
    return nn.Sequential(*layers)


def default_vgg_path() -> Path:
    torch_home = os.environ.get("TORCH_HOME", os.path.join(os.path.expanduser("~"), ".cache", "torch"))
    return Path(torch_home) / "hub" / "checkpoints" / VGG16_FILE


def lpips_heads_path() -> Path:
    """The installed lpips package's VGG heads if present (found without importing lpips), else ours."""
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
        if candidate.is_file():
            return candidate
    return BUNDLED_HEADS


def _load_tensors(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 trunk: 0 for identical images, one value per image pair."""

    def __init__(self, vgg_weights: str | Path | None = None, heads: str | Path | None = None, pretrained: bool = True):
        super().__init__()
        self.features = vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            self.load_vgg(Path(vgg_weights).expanduser() if vgg_weights else default_vgg_path())
        self.load_heads(Path(heads) if heads else lpips_heads_path())
        self.requires_grad_(False).eval()

    def load_vgg(self, path: Path) -> None:
        if not path.is_file():
            raise PrxError(
                f"LPIPS needs torchvision's VGG16 ImageNet weights and found none at {path}: download {VGG16_URL} "
                f"there (or anywhere, and set perceptual.lpips_vgg_weights to the file), or set "
                f"perceptual.lpips_weight=0 to train without LPIPS"
            )
        state = _load_tensors(path)
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        missing, unexpected = self.features.load_state_dict(features, strict=False)
        if missing or unexpected:
            raise PrxError(f"{path} is not a torchvision VGG16 state dict (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")

    def load_heads(self, path: Path) -> None:
        state = _load_tensors(path)
        for k, head in enumerate(self.heads):
            head.weight.data.copy_(state[f"lin{k}.model.1.weight"])

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def taps(self, x: Tensor) -> list[Tensor]:
        """Unit-length (along channels) features at relu1_2 … relu5_3 of images in [-1, 1]."""
        h = (x.float() - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features[: LPIPS_TAPS[-1] + 1]):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y in [-1, 1], (B, 3, H, W) → (B,) distances. A y without grad costs no backward."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and y.requires_grad):
            fy = self.taps(y)
        fx = self.taps(x)
        return sum(head((a - b) ** 2).mean((1, 2, 3)) for head, a, b in zip(self.heads, fx, fy))
