"""REPA: the alignment term against its definition, on visible tokens only, and its teachers."""



import pytest
import torch

from conftest import tiny_model
from prx.errors import PrxError
from prx.model import Route
from prx.tread import TREADRouter


class StubTeacher(torch.nn.Module):
    """Returns fixed features: lets a test change what the teacher says at chosen tokens."""

    def __init__(self, features):
        super().__init__()
        self.features, self.hidden_dim, self.patch_size = features, features.shape[-1], 16

    def forward(self, images, grid, mode="bilinear"):
        return self.features


def _repa_with(features, model_dim):
    from prx.repa import REPAAlignment

    return REPAAlignment("stub", loss_weight=0.5, apply_at_block=2, projector_dim=16).setup(
        model_dim, 4, teacher=StubTeacher(features))


def test_repa_is_minus_weight_when_aligned_up_to_scale():
    features = torch.randn(2, 9, 8)
    repa = _repa_with(features, model_dim=8)
    repa.projector = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        repa.projector.weight.copy_(3.0 * torch.eye(8))  # the student says 3× what the teacher says
    loss = repa(features.clone(), torch.zeros(2, 3, 48, 48), (3, 3))
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)


def test_repa_aligns_only_visible_tokens():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    features = torch.randn(2, 9, 8)
    repa = _repa_with(features, model_dim=model.config.hidden_dim)
    x, t = torch.randn(2, 3, 48, 48), torch.rand(2)
    txt, mask = torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    keep = torch.tensor([[0, 2, 4, 6, 8], [1, 2, 3, 5, 7]])
    out = model(x, t, txt, mask, route=Route(1, 2, keep), capture_block=repa.block_index)
    assert out.hidden.shape[1] == 5 and torch.equal(out.hidden_index, keep)
    loss = repa(out.hidden, x, (3, 3), out.hidden_index)
    # what the teacher says at routed tokens does not matter; at visible tokens it does
    routed_changed = features.clone()
    routed_changed[0, [1, 3, 5, 7]] = torch.randn(4, 8)
    routed_changed[1, [0, 4, 6, 8]] = torch.randn(4, 8)
    repa.teacher.features = routed_changed
    assert repa(out.hidden, x, (3, 3), out.hidden_index).item() == pytest.approx(loss.item(), abs=1e-6)
    visible_changed = features.clone()
    visible_changed[0, 0] = torch.randn(8)
    repa.teacher.features = visible_changed
    assert repa(out.hidden, x, (3, 3), out.hidden_index).item() != pytest.approx(loss.item(), abs=1e-6)
    # and its gradient reaches the denoiser
    repa.teacher.features = features
    repa(out.hidden, x, (3, 3), out.hidden_index).backward()
    assert model.blocks[1].img_qkv.weight.grad.abs().sum() > 0


def test_real_teacher_grid_matches_token_grid():
    from prx.repa import REPAAlignment

    repa = REPAAlignment("tiny-random-dinov3", apply_at_block=2, projector_dim=16).setup(64, 4)
    assert repa.teacher.patch_size == 16
    feats = repa.teacher_features(torch.rand(2, 3, 64, 96) * 2 - 1, (4, 6))
    assert feats.shape == (2, 24, repa.teacher.hidden_dim)  # CLS and the 4 registers dropped
    assert not repa.teacher.training and not any(p.requires_grad for p in repa.teacher.parameters())


def test_missing_teacher_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    from prx.teachers import VisionTeacher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrxError) as err:
        VisionTeacher.load("dinov3")
    message = str(err.value)
    assert "facebook/dinov3-vitl16-pretrain-lvd1689m" in message and "Hugging Face cache" in message
    assert "hf download" in message and "gated" in message
    with pytest.raises(PrxError, match="local directory"):
        VisionTeacher.load(str(tmp_path))


def test_repa_aligns_the_visible_tokens_of_a_non_square_grid():
    """A 12×21 bucket (252 tokens), half of them routed: the loss is −w·mean cos over the visible tokens of
    the teacher's features on that very grid — computed here from the definition."""
    from prx.repa import REPAAlignment

    model = tiny_model(patch_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    repa = REPAAlignment("tiny-random-dinov3", loss_weight=0.5, apply_at_block=2, projector_dim=16).setup(64, 4)
    x = torch.rand(2, 3, 12 * 16, 21 * 16) * 2 - 1
    route = TREADRouter(0.5, start_block=1, end_block=-2).route(step=0, first=0, count=2, num_tokens=252, num_layers=4)
    assert route.keep.shape == (2, 126)
    out = model(x, torch.rand(2), torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool), route=route,
                capture_block=repa.block_index)
    assert out.hidden.shape[:2] == (2, 126) and torch.equal(out.hidden_index, route.keep)
    loss = repa(out.hidden, x, (12, 21), out.hidden_index)
    # the definition: the teacher sees the clean image at 12·16 × 21·16 px, one feature per token of the grid
    teacher = repa.teacher.model(pixel_values=((x + 1) / 2 - repa.teacher.mean) / repa.teacher.std).last_hidden_state
    target = teacher[:, repa.teacher.num_prefix_tokens:]
    assert target.shape[1] == 252
    visible = torch.stack([target[b, route.keep[b]] for b in range(2)])
    expected = -0.5 * torch.nn.functional.cosine_similarity(repa.projector(out.hidden), visible, dim=-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
