"""The perceptual losses: LPIPS-VGG (LPIPS(x, x) = 0) and the DINOv2 patch cosine, against their definitions."""

import pytest
import torch

from prx.errors import PrxError


def test_vgg_trunk_has_torchvision_names():
    from prx.lpips import vgg16_features

    names = [k for k in vgg16_features().state_dict()]
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert names == [f"{i}.{w}" for i in convs for w in ("weight", "bias")]


def test_lpips_zero_for_identical_and_grows_with_distortion():
    from prx.lpips import LPIPS
    from prx.stand_ins import stand_in_path

    lpips = LPIPS(stand_in_path("tiny-random-vgg16"))
    assert all(h.weight.abs().sum() > 0 for h in lpips.heads)  # the real lpips heads, not zeros
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2))
    noise = torch.randn(x.shape, generator=g)
    d = [lpips(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.02, 0.1, 0.4)]
    assert 0 < d[0] < d[1] < d[2]


def test_lpips_missing_vgg_weights_is_a_clear_error(tmp_path):
    from prx.lpips import LPIPS

    with pytest.raises(PrxError, match="VGG16 ImageNet weights.*vgg16-397923af.pth"):
        LPIPS(tmp_path / "nope.pth")


def test_perceptual_loss_definitions_and_gradients():
    from prx.perceptual import PerceptualLoss

    loss = PerceptualLoss(lpips_weight=0.1, dino_weight=0.01, dino_model="tiny-random-dinov2", dino_resolution=56,
                          lpips_vgg_weights="tiny-random-vgg16").load()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    t = torch.tensor([0.2, 0.9])
    same = loss(x0.clone(), x0, t)
    assert same["lpips"].item() == 0.0 and same["dino"].item() == pytest.approx(0.0, abs=1e-6)
    pred = (x0 + 0.3 * torch.randn(x0.shape, generator=g)).requires_grad_()
    terms = loss(pred, x0, t)
    assert terms["lpips"] > 0 and terms["dino"] > 0
    sum(terms.values()).backward()  # gradients flow through the frozen networks into x̂0
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.lpips.parameters())
    # a t threshold drops the noisier samples
    gated = PerceptualLoss(0.1, 0.0, apply_at_all_noise_levels=False, t_threshold=0.5,
                           lpips_vgg_weights="tiny-random-vgg16").load()
    only_first = gated(pred, x0, t)["lpips"]
    assert only_first.item() == pytest.approx(0.1 * gated.lpips(
        torch.nn.functional.interpolate(pred[:1], size=(32, 32), mode="bilinear", antialias=True),
        torch.nn.functional.interpolate(x0[:1], size=(32, 32), mode="bilinear", antialias=True)).item(), rel=1e-4)


def test_dino_perceptual_keeps_the_aspect_ratio():
    from prx.teachers import aspect_grid

    assert aspect_grid(512, 512, 256) == (16, 16)
    assert aspect_grid(384, 672, 256) == (12, 21)  # a 12×21 bucket: as many patches, not squashed to 16×16
    assert aspect_grid(704, 352, 256) == (23, 11)
    seen = []

    class Spy(torch.nn.Module):
        patch_size, hidden_dim = 14, 8

        def forward(self, images, grid, mode="bilinear"):
            seen.append(grid)
            return torch.ones(images.shape[0], grid[0] * grid[1], 8)

    from prx.perceptual import PerceptualLoss

    loss = PerceptualLoss(lpips_weight=0.0, dino_weight=0.01)
    loss.dino = Spy()
    loss(torch.zeros(1, 3, 96, 168), torch.zeros(1, 3, 96, 168), torch.tensor([0.5]))
    assert seen == [(12, 21), (12, 21)]
