"""The path a real user walks: photos of many aspect ratios → `prx data convert` → the whole recipe
(TREAD, REPA, LPIPS + DINO, Muon, two stages) on aspect-ratio buckets → `prx sample` at several aspect
ratios → `prx export`; and the same run under 2 gloo processes with FSDP2."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from photos import load_photos, write_photo_folder
from prx.cli import main

BIN = Path(sys.executable).parent
RECIPE = ["speedrun-tiny", "data.dataset=shards", "data.num_workers=1", "logging.log_every=1",
          "logging.progress_bar=false", "logging.tensorboard=false", "train.num_threads=1"]


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    # 3 copies of the 19 photos: 57 samples in 2 row groups, so each of 2 ranks can read its own
    write_photo_folder(root / "folder", copies=3)
    assert main(["data", "convert", "--from", "folder", str(root / "folder"), "--out", str(root / "shards"),
                 "--workers", "1"]) == 0
    return root / "shards"


def test_the_photos_are_real_and_of_many_shapes():
    photos = load_photos()
    aspects = sorted(image.shape[1] / image.shape[0] for image, _ in photos.values())
    assert len(photos) == 19 and aspects[0] < 0.9 and aspects[-1] > 2.0 and any(a == 1 for a in aspects)
    assert all(caption for _, caption in photos.values())


@pytest.mark.slow
def test_photos_convert_train_the_recipe_sample_and_export(photo_shards, tmp_path, capsys):
    manifest = json.loads((photo_shards / "manifest.json").read_text())
    assert manifest["samples"] == 57 and manifest["rejected"]["count"] == 0
    run = tmp_path / "run"
    assert main(["train", *RECIPE, f"data.shards=[{photo_shards}]", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "stage 1/2: 64px" in out and "stage 2/2: 128px" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(set(r) >= {"loss/flow", "loss/lpips", "loss/dino"} for r in rows)
    assert all("loss/repa" in r for r in rows[:6]) and not any("loss/repa" in r for r in rows[6:])

    # the data's buckets: wide photos and squares at both resolutions; sample grids show both
    from prx.config import load_config
    from prx.data.sources import build_source
    from prx.logger import sample_sizes

    cfg = load_config(str(run / "config.yaml"))
    source = build_source(cfg)
    sizes64, sizes128 = source.sizes(cfg.stages[0]), source.sizes(cfg.stages[1])
    assert {(80, 48), (64, 64)} <= set(sizes64) and len(sizes128) >= 3
    assert len(sample_sizes(sizes64)) == 2 and sorted(p.name for p in (run / "samples").iterdir())
    # the block calls of this run: each bucket's tokens, and its routed tokens in the TREAD blocks; too many for
    # train.compile_shapes auto to compile them static on a GPU (a graph each)
    import torch

    from prx.execution import block_shapes, plan_training
    from prx.tread import TREADRouter

    router = TREADRouter.from_config(cfg.tread, cfg.train.seed)
    shapes = block_shapes(cfg, source.sizes, 1, router.num_kept)
    p = cfg.model.patch_size
    tokens = {(w // p) * (h // p) for w, h in sizes64 + sizes128}
    assert {n for _, n, routed in shapes if not routed} == tokens
    assert {n for _, n, routed in shapes if routed} == {router.num_kept(n) for n in tokens}
    # nor replays them as CUDA graphs (train.cuda_graphs auto), even with one micro-batch and one caption length
    steady = replace(cfg, text=replace(cfg.text, min_length=cfg.text.max_length),
                     train=replace(cfg.train, micro_batch_size=0))
    gpu_plan = plan_training(steady, torch.device("cuda"), 1, shapes)
    assert len(shapes) > 8 and not gpu_plan.static_shapes and not gpu_plan.cuda_graphs

    # sampling at two aspect ratios (the nearest 128 px buckets) and an explicit size
    for ratio, size in (("16:9", (176, 96)), ("3:4", (112, 144))):
        code = main(["sample", "--checkpoint", str(run), "--prompt", "a cup of coffee", "--prompt", "a rocket",
                     "--aspect-ratio", ratio, "--steps", "2", "--out", str(tmp_path / ratio.replace(":", "x"))])
        assert code == 0
        for name in ("0000.png", "0001.png"):
            assert Image.open(tmp_path / ratio.replace(":", "x") / name).size == size
    export = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(export)]) == 0
    assert main(["sample", "--checkpoint", str(export), "--prompt", "a flower", "--width", "160", "--height", "96",
                 "--steps", "1", "--out", str(tmp_path / "from_export")]) == 0
    assert Image.open(tmp_path / "from_export" / "0000.png").size == (160, 96)


@pytest.mark.slow
def test_the_same_photo_run_under_two_processes_with_fsdp(photo_shards, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "prx.cli", "train",
                             *RECIPE, f"data.shards=[{photo_shards}]", "train.parallel=fsdp",
                             "data.sharding=row_groups",  # each rank its own row group (tests/test_small_data.py: rows)
                             "train.timeout_minutes=2", "--out", str(run)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(r["loss/total"] == r["loss/total"] for r in rows)  # finite, not NaN
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a motorcycle", "--aspect-ratio", "2:1",
                 "--steps", "1", "--out", str(tmp_path / "s")]) == 0
    assert Image.open(tmp_path / "s" / "0000.png").size == (176, 96)


def test_bench_on_the_photos_runs_their_buckets_and_says_how_captions_were_encoded(photo_shards, tmp_path, capsys):
    """`prx bench` on converted photos: the loader reads batches in order (not a function of the step), so the
    captions cannot be encoded ahead of the timed steps and the result says they were encoded in the step."""
    out = tmp_path / "bench.json"
    assert main(["bench", *RECIPE, f"data.shards=[{photo_shards}]", "--steps", "2", "--warmup", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["text"] == "encoded in the step" and "captions encoded in the step" in capsys.readouterr().out
    assert result["images_per_s"] > 0 and result["flops_per_step"]["denoiser"] > 0
