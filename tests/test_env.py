"""`prx env`: what it reports about the cached weights is what is on disk, found without a network."""

import json
import os
import subprocess
import sys

import pytest


def cached_repo(hub, repo_id, files):
    """A Hugging Face cache entry as `hf download` leaves it: refs/main → a snapshot holding ``files``."""
    root = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123456789abcdef")
    for name in files:
        (snapshot / name).write_text("{}")


@pytest.mark.slow
def test_env_reports_the_weights_in_the_cache_and_the_plan(tmp_path):
    hub, torch_home = tmp_path / "hub", tmp_path / "torch"
    cached_repo(hub, "facebook/dinov2-large", ["config.json", "model.safetensors"])
    cached_repo(hub, "openai/clip-vit-large-patch14-336", ["config.json"])  # an interrupted download
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    (torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"x")
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "TORCH_HOME": str(torch_home), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "prx", "env", "--json", "--config", "tiny"], env=env, text=True,
                         capture_output=True, timeout=300, check=True).stdout
    info = json.loads(out)
    weights = {w["name"]: w for w in info["weights"]}
    assert weights["facebook/dinov2-large"]["present"] and str(hub) in weights["facebook/dinov2-large"]["where"]
    clip = weights["openai/clip-vit-large-patch14-336"]
    assert not clip["present"] and clip["note"] == "config.json but no weights"
    assert clip["get"] == "hf download openai/clip-vit-large-patch14-336"
    assert weights["vgg16-397923af.pth"]["present"] and not weights["pt_inception-2015-12-05-6726825d.pth"]["present"]
    assert not weights["google/t5gemma-2b-2b-ul2"]["present"] and weights["minilm"]["present"]
    assert "gated" in weights["facebook/dinov3-vitl16-pretrain-lvd1689m"]["get"]
    assert info["huggingface"]["cache"] == str(hub) and info["huggingface"]["offline"]
    plan = info["plan"]
    assert plan["config"] == "tiny" and plan["device"] == "cpu" and plan["parallel"] == "none"
    assert plan["precision"] == "fp32" and plan["processes"] == 1  # tiny pins fp32
    assert info["cpu"]["vector_isa"] and isinstance(info["compile"]["builds"], bool)
    from prx.envinfo import format_report

    text = format_report(info)
    assert "prx train tiny here: cpu, fp32" in text and "NO   eval: FID Inception" in text
