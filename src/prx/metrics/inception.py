"""The FID Inception-v3: the network behind the standard FID numbers, defined in-house.

It is the TensorFlow ``inception-2015-12-05`` graph as ported by pytorch-fid: torchvision's
Inception-v3 layout (so parameter names match ``pt_inception-2015-12-05-6726825d.pth`` and the
file loads as is) with four differences in the mixed blocks: the average pools of the A, C and
first E blocks leave padding out of the average (TensorFlow's behaviour), and the last E block
pools with a max instead of an average. Features are the 2048-d output of the final average pool.

Preprocessing is pytorch-fid's: images in [0, 1], bilinear resize to 299×299 (no antialias),
then scaled to [-1, 1].
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prx.errors import PrxError
from prx.metrics import FID_WEIGHTS_FILE, FID_WEIGHTS_URL

INPUT_SIZE = 299
FEATURE_DIM = 2048


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU: torchvision's ``BasicConv2d``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3×3 average pool, stride 1, whose border averages count only the pixels inside (TensorFlow)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):  # Mixed_5b, 5c, 5d (35×35)
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class MixedB(nn.Module):  # Mixed_6a: 35×35 → 17×17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class MixedC(nn.Module):  # Mixed_6b … 6e (17×17), factorised 7×7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_tf_avg_pool(x))], 1)


class MixedD(nn.Module):  # Mixed_7a: 17×17 → 8×8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):  # Mixed_7b (TF average pool), Mixed_7c (max pool), 8×8
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """(B, 3, H, W) images in [0, 1] → (B, 2048) pool features, as pytorch-fid computes them."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the TF graph's 1008-class logits: unused for FID, kept so the file loads
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        return super().train(False)  # batch norm always uses its running statistics

    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def random_inception() -> nn.Module:
    """The FID Inception with He-initialised convolutions and identity batch norms: activations keep
    their scale through the 94 layers (so the features are neither 0 nor huge)."""
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_in))
    return net


def default_weights_path() -> Path:
    """``$TORCH_HOME/hub/checkpoints/pt_inception-…pth``, where torch.hub (and pytorch-fid) keep it."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def resolve_weights(path: str | Path | None = None) -> Path:
    """The FID weights file (an explicit path or the torch.hub location), or a
    one-line error that says where to put it."""
    where = Path(os.path.expanduser(str(path))) if path else default_weights_path()
    if not where.is_file():
        how = ("pass it with --inception-weights FILE" if path
               else f"put it at {where} (or pass --inception-weights FILE)")
        raise PrxError(f"FID needs the Inception weights file {FID_WEIGHTS_FILE} and found none at {where}: "
                       f"download {FID_WEIGHTS_URL} and {how}")
    return where


def load_fid_inception(path: str | Path | None = None) -> FIDInceptionV3:
    where = resolve_weights(path)
    try:
        state = torch.load(str(where), map_location="cpu", weights_only=True)
    except Exception as e:
        raise PrxError(f"cannot read the Inception weights {where} ({type(e).__name__}: {str(e)[:100]}): "
                       f"download {FID_WEIGHTS_URL} again") from None
    model = FIDInceptionV3()
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise PrxError(f"{where} is not the FID Inception state dict (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}): download {FID_WEIGHTS_URL}")
    return model.requires_grad_(False).eval()
