"""Quality metrics for real data, checked against their definitions with random stand-in extractors."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from prx.cli import main

BIN = Path(sys.executable).parent
STAND_INS = ["--inception-weights", "random-inception", "--clip-model", "tiny-random-clip",
             "--dino-model", "tiny-random-dinov2"]
ALL = "fid,fd_dinov2,cmmd,clip_score,val_loss"


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny run and held-out shards that look like users' data
# --------------------------------------------------------------------------------------------


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * rng.random(3)[None, None]  # structure + noise
    pixels = (0.6 * ramp + 0.4 * rng.random((height, width, 3)) * 255).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


SIZES = [(64, 48), (48, 64), (96, 48), (40, 80), (50, 50)]  # non-square, several aspect ratios


def write_heldout(root: Path, count: int = 5, corrupt: int | None = 3) -> Path:
    """Two shards of ``count`` samples (small row groups); sample ``corrupt`` holds broken bytes."""
    from prx.data.shards import write_shard

    rows = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        data = b"not an image at all" if i == corrupt else _png(w, h, i)
        rows.append({"id": f"s{i}", "image": data, "width": w, "height": h, "format": "PNG", "source": "test",
                     "caption": f"a photo of thing number {i}", "prompt": "" if i % 3 == 0 else f"prompt {i}"})
    root.mkdir(parents=True, exist_ok=True)
    half = count // 2
    write_shard(root / "part-0.parquet", rows[:half], ["caption", "prompt"], rows_per_group=3)
    write_shard(root / "part-1.parquet", rows[half:], ["caption", "prompt"], rows_per_group=3)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from prx.train import Trainer

    path = tmp_path_factory.mktemp("metrics") / "run"
    Trainer(tiny_config("train.steps=2"), path).run()
    return path


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    return write_heldout(tmp_path_factory.mktemp("heldout") / "shards")


@pytest.fixture(scope="module")
def pipe(run_dir):
    from prx.pipeline import Pipeline

    return Pipeline.from_checkpoint(run_dir, device="cpu")


# --------------------------------------------------------------------------------------------
# Statistics against closed forms and direct computations
# --------------------------------------------------------------------------------------------


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form(mu1, s1, mu2, s2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½), all symmetric (no complex numbers anywhere)."""
    r = _sqrtm_psd(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrtm_psd(r @ s2 @ r)))


def _random_covariance(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_equals_the_closed_form_for_gaussians():
    from prx.metrics.stats import FrechetMetric, frechet_distance

    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
    value, imaginary = frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2)))
    assert value == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-10)
    assert imaginary < 1e-10
    low_rank = s1[:, :2] @ s1[:2, :]  # singular Σ1 (fewer samples than dimensions): the other path
    value, _ = frechet_distance(*(torch.from_numpy(x) for x in (mu1, low_rank, mu2, s2)))
    assert value == pytest.approx(_closed_form(mu1, low_rank, mu2, s2), rel=1e-7)  # √ of rounding-level eigenvalues
    # diagonal covariances: Σ (√a − √b)²
    a, b = rng.random(d) + 0.5, rng.random(d) + 0.5
    diag, _ = frechet_distance(torch.zeros(d), torch.diag(torch.from_numpy(a)), torch.ones(d), torch.diag(torch.from_numpy(b)))
    assert diag == pytest.approx(d + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-12)

    # The metric's float64 sums give exactly the Fréchet distance of the sample statistics, which
    # approaches the closed form of the true Gaussians.
    n = 20_000
    x = rng.multivariate_normal(mu1, s1, n)
    y = rng.multivariate_normal(mu2, s2, n)
    metric = FrechetMetric(num_features=d)
    for chunk in np.array_split(x, 7):
        metric.update(torch.from_numpy(chunk).float(), real=True)
    for chunk in np.array_split(y, 3):
        metric.update(torch.from_numpy(chunk).float(), real=False)
    result = metric.compute()
    x32, y32 = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    sample = _closed_form(x32.mean(0), np.cov(x32, rowvar=False), y32.mean(0), np.cov(y32, rowvar=False))
    assert float(result["value"]) == pytest.approx(sample, rel=1e-9)
    assert float(result["value"]) == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=0.05)
    assert int(result["num_real"]) == int(result["num_fake"]) == n


@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero_and_warns_below_2048():
    from prx.metrics.fid import FID

    fid = FID(weights="random-inception")
    images = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(_png(64, 48, s)))) for s in range(3)]))
    images = images.permute(0, 3, 1, 2).contiguous()
    features = fid.add_images(images, real=True)
    assert features.shape == (3, 2048) and features.abs().sum() > 0
    fid.update(features, real=False)
    result = fid.compute()
    assert abs(float(result["value"])) < 1e-5 * float(features.double().var(0).sum())
    assert "biased" in fid.bias_warning(int(result["num_real"]))
    assert fid.bias_warning(2048) is None


def test_fid_inception_has_the_weight_files_layout(tmp_path, monkeypatch):
    from prx.errors import PrxError
    from prx.metrics.inception import FIDInceptionV3, load_fid_inception

    state = FIDInceptionV3().state_dict()
    # torchvision's Inception3 without aux logits, 1008 classes: 27,161,264 − 3,326,696 (aux) + 8·2049
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 23_850_960
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert state["fc.weight"].shape == (1008, 2048)
    # a file without num_batches_tracked (older torch) loads too; a foreign one is a one-line error
    torch.save({k: v for k, v in state.items() if "num_batches" not in k}, tmp_path / "old.pth")
    load_fid_inception(tmp_path / "old.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "vgg.pth")
    with pytest.raises(PrxError, match="not the FID Inception state dict"):
        load_fid_inception(tmp_path / "vgg.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PrxError) as e:
        load_fid_inception()
    message = str(e.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth") in message
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" in message and "\n" not in message


def test_cmmd_equals_a_direct_pairwise_computation():
    from prx.metrics.cmmd import CMMD
    from prx.metrics.extractors import ClipExtractor

    clip = ClipExtractor("tiny-random-clip")
    cmmd = CMMD(clip)
    assert (cmmd.sigma, cmmd.scale) == (10.0, 1000.0)
    rng = np.random.default_rng(1)
    real = torch.from_numpy((rng.random((7, 3, 40, 40)) * 255).astype(np.uint8))
    fake = torch.from_numpy((rng.random((5, 3, 40, 40)) * 255).astype(np.uint8))
    order = [4, 0, 6, 2, 5, 1, 3]  # arrives out of order, in two batches
    x = torch.zeros(7, clip.dim, dtype=torch.float64)
    for part in (order[:3], order[3:]):
        x[part] = cmmd.add_images(real[part], real=True, index=torch.tensor(part)).double()
    y = cmmd.add_images(fake, real=False, index=torch.arange(5)).double()
    assert torch.allclose(x.norm(dim=1), torch.ones(7, dtype=torch.float64), atol=1e-6)  # L2-normalised

    def k(a, b):
        return float(torch.exp(-((a - b) ** 2).sum() / (2 * 10.0**2)))

    def mean_k(a, b):
        return sum(k(u, v) for u in a for v in b) / (len(a) * len(b))

    direct = 1000 * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))
    result = cmmd.compute()
    assert float(result["value"]) == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert (int(result["num_real"]), int(result["num_fake"])) == (7, 5)
    # identical sets: 0; the metric is symmetric
    from prx.metrics.stats import rbf_mmd

    assert abs(rbf_mmd(x, x)) < 1e-12
    assert rbf_mmd(x, y) == pytest.approx(rbf_mmd(y, x), rel=1e-12)


def test_clip_score_is_100_max_cos_0_through_transformers():
    import transformers as tf

    from prx.metrics.clip_score import CLIPScore, clip_scores
    from prx.metrics.extractors import CLIP_MEAN, CLIP_STD, ClipExtractor, resize_square
    from prx.metrics.tiny import tiny_extractor_path

    clip = ClipExtractor("tiny-random-clip", text=True)
    score = CLIPScore(clip)
    rng = np.random.default_rng(2)
    images = torch.from_numpy((rng.random((4, 3, 48, 48)) * 255).astype(np.uint8))
    prompts = ["a red circle", "two dogs on a beach at sunset", "", "an astronaut riding a horse"]
    score.add_images(images, prompts)
    # the same through CLIPModel's own forward: logits_per_image = exp(logit_scale)·cos
    path = tiny_extractor_path("tiny-random-clip")
    model = tf.CLIPModel.from_pretrained(path).eval()
    tokens = tf.AutoTokenizer.from_pretrained(path)(prompts, padding=True, return_tensors="pt")
    pixels = resize_square(images.float() / 255, 56, "bicubic", True)
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    cos = out.logits_per_image.diag().double() / model.logit_scale.exp().double()
    expected = float((100 * cos.clamp_min(0)).mean().detach())
    result = score.compute()
    assert float(result["value"]) == pytest.approx(expected, rel=1e-5)
    assert int(result["num_fake"]) == 4
    a = torch.randn(3, 8)
    assert torch.allclose(clip_scores(a, a), torch.full((3,), 100.0, dtype=torch.float64))
    assert torch.equal(clip_scores(a, -a), torch.zeros(3, dtype=torch.float64))  # negative cosines count as 0


# --------------------------------------------------------------------------------------------
# The real-data evaluation
# --------------------------------------------------------------------------------------------


def test_resize_is_the_same_function_for_real_and_generated_images():
    from prx.metrics.evaluate_real import resize_center_crop

    generated = (np.random.default_rng(3).random((48, 48, 3)) * 255).astype(np.uint8)
    assert resize_center_crop(generated, 48) is generated  # already the size: untouched
    wide = np.zeros((48, 144, 3), np.uint8)
    wide[:, 36:108] = 255  # white centre half, black sides
    out = resize_center_crop(Image.fromarray(wide), 24)
    assert out.shape == (24, 24, 3) and out.min() >= 250  # the centre crop of a 72×24 resize


def test_heldout_selection_is_seeded_and_captions_fall_back(heldout):
    from prx.metrics.evaluate_real import HeldOutSet, _GroupCache

    a, b = HeldOutSet.open(str(heldout), 3, seed=0), HeldOutSet.open(str(heldout), 3, seed=0)
    assert np.array_equal(a.samples, b.samples) and np.all(np.diff(a.samples) > 0)
    assert any(not np.array_equal(a.samples, HeldOutSet.open(str(heldout), 3, seed=s).samples) for s in (1, 2, 3))
    assert a.caption_columns == ["caption", "prompt"]  # the shards' order, not alphabetical
    full = HeldOutSet.open(str(heldout), 5, seed=0, caption_column="prompt")
    images, captions, kept, skipped = full.load(range(5), 32, _GroupCache())
    assert kept == [0, 1, 2, 4] and dict(skipped) == {"not an image": 1}
    assert captions[0] == "a photo of thing number 0"  # empty prompt → the next column
    assert captions[1] == "prompt 1" and all(i.shape == (32, 32, 3) for i in images)


def test_val_loss_is_bitwise_repeatable_and_binned(pipe, heldout):
    from prx.flow import add_noise, flow_loss
    from prx.metrics.evaluate_real import HeldOutSet, evaluate_real
    from prx.metrics.val_loss import encode_batch, fixed_noise_and_time

    first = evaluate_real(pipe, str(heldout), ["val_loss"], num_samples=5, batch_size=3, seed=5)
    again = evaluate_real(pipe, str(heldout), ["val_loss"], num_samples=5, batch_size=3, seed=5)
    assert first["metrics"] == again["metrics"]  # bitwise: floats compared with ==
    loss = first["metrics"]["val_loss"]
    assert loss["num_samples"] == first["settings"]["evaluated"] == 4
    bins = loss["bins"].values()
    assert sum(b["n"] for b in bins) == 4
    weighted = sum(b["value"] * b["n"] for b in bins if b["n"]) / 4
    assert loss["value"] == pytest.approx(weighted, rel=1e-12)
    # a sample's noise and time depend on (seed, sample) only
    n1, t1 = fixed_noise_and_time(3, (3, 8, 8), 5, 1e-3)
    n2, t2 = fixed_noise_and_time(3, (3, 8, 8), 5, 1e-3)
    assert torch.equal(n1, n2) and t1 == t2 and fixed_noise_and_time(4, (3, 8, 8), 5, 1e-3)[1] != t1
    # the overall value is the mean of the trainer's flow_loss on each sample alone
    held = HeldOutSet.open(str(heldout), 5, seed=5)
    from prx.metrics.evaluate_real import _GroupCache

    images, captions, kept, _ = held.load(range(5), 48, _GroupCache())
    total = 0.0
    for image, caption, p in zip(images, captions, kept):
        x0 = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        noise, t = fixed_noise_and_time(p, (3, 48, 48), 5, pipe.config.objective.t_min)
        t = torch.tensor([t])
        x_t = add_noise(x0, noise[None], t)
        text = encode_batch(pipe.text_encoder, [caption])
        with torch.no_grad():
            pred = pipe.model(x_t, t, text.embeds, text.mask).x0
        total += float(flow_loss(pred, x0, x_t, t, pipe.config.objective.t_clamp))
    assert loss["value"] == pytest.approx(total / 4, rel=1e-4)


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(run_dir, heldout, tmp_path, capsys):
    # FID leaves this comparison: its full-size (random) Inception costs ~20 s per process, and it shares
    # the Fréchet statistics and their reduction across ranks with fd_dinov2, compared here
    common = ["eval", "--checkpoint", str(run_dir), "--data", str(heldout), "--metrics", "fd_dinov2,cmmd,clip_score,val_loss",
              "--num-samples", "5",
              "--batch-size", "2", "--device", "cpu", *STAND_INS]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    assert "fd_dinov2" in out and "val_loss t in [0.6, 1.0]" in out and "biased" in out
    result = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "prx.cli", *common,
                             "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    # 5 samples in batches of 2: rank 0 takes batches 0 and 2 (2 + 1), rank 1 batch 1 (with the unreadable one)
    assert one["settings"]["samples_per_rank"] == [4]
    assert two["settings"]["samples_per_rank"] == [3, 1] and two["settings"]["world_size"] == 2
    assert one["settings"]["skipped"] == two["settings"]["skipped"] == {"not an image": 1}
    assert one["metrics"]["val_loss"] == two["metrics"]["val_loss"]  # bitwise
    for name in ("fd_dinov2", "cmmd", "clip_score"):
        a, b = one["metrics"][name], two["metrics"][name]
        assert (a["num_real"], a["num_fake"]) == (b["num_real"], b["num_fake"]) == (4, 4), name
        assert b["value"] == pytest.approx(a["value"], rel=1e-5, abs=1e-9), name
    assert two["metrics"]["clip_score"]["real_images"] == pytest.approx(one["metrics"]["clip_score"]["real_images"])


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any sampling
# --------------------------------------------------------------------------------------------


def _one_line_error(capsys, argv, fragment):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    return lines[0]


def test_bad_inputs_are_one_line_errors_before_sampling(run_dir, heldout, tmp_path, capsys, monkeypatch):
    from prx.data.shards import write_shard
    from prx.pipeline import Pipeline

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the inputs")

    monkeypatch.setattr(Pipeline, "generate", no_sampling)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    base = ["eval", "--checkpoint", str(run_dir), "--num-samples", "4"]
    data = ["--data", str(heldout)]
    line = _one_line_error(capsys, [*base, *data, "--metrics", "fid,fidd", *STAND_INS], "unknown metric 'fidd'")
    assert "fid, fd_dinov2, cmmd, clip_score, val_loss" in line
    _one_line_error(capsys, [*base, "--data", str(tmp_path / "nowhere")], "no shards found")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, [*base, "--data", str(tmp_path / "empty")], "no shards found")
    (tmp_path / "zero").mkdir()
    write_shard(tmp_path / "zero" / "z.parquet", [], ["caption"])
    _one_line_error(capsys, [*base, "--data", str(tmp_path / "zero")], "hold no samples")
    _one_line_error(capsys, [*base, *data, "--num-samples", "6"], "more than the 5 samples")
    line = _one_line_error(capsys, [*base, *data, "--metrics", "fid"], "pt_inception-2015-12-05-6726825d.pth")
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in line and "https://github.com/mseitzer" in line
    _one_line_error(capsys, [*base, *data, "--metrics", "fid", "--inception-weights", str(tmp_path / "x.pth")],
                    "found none at")
    _one_line_error(capsys, [*base, *data, "--metrics", "cmmd", "--clip-model", "nobody/no-such-clip"],
                    "CLIP model 'nobody/no-such-clip' is not available offline")
    _one_line_error(capsys, [*base, "--metrics", "fid"], "--metrics needs --data")
    _one_line_error(capsys, [*base, *data, "--metrics", "fid", "--num-samples", "1", *STAND_INS], "at least 2 samples")


@pytest.mark.slow
def test_a_rank_without_samples_still_computes_the_same_values():
    script = Path(__file__).parent / "dist" / "metrics_empty_rank.py"
    result = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        assert r["counts"] == [5, 4, 5]
        assert r["mmd"] == pytest.approx(r["mmd_expected"], rel=1e-12)
        assert r["fd"] == pytest.approx(r["fd_expected"], rel=1e-9)
