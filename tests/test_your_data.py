"""Your data by default: a run on shards draws its sample grids from its own captions (held-out first), records them,
and its export's snippet and model card use them; `prx eval` and `prx data inspect` follow the run's data and config
instead of assuming the shapes world."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from prx.cli import main
from prx.config import load_config
from prx.config.run import SHAPES_PROMPTS
from prx.data.index import ShardIndex, sample_captions
from prx.data.sources import build_source, sample_prompts
from prx.data.split import split_shards
from test_diffusers import one_line_error, run_cli, write_run
from test_small_data import photo_shard


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("yours")
    photo_shard(root / "all" / "photos.parquet", 19)
    split_shards([str(root / "all")], 0.3, root / "train", root / "heldout")
    return root / "train", root / "heldout"


def captions_of(shards: Path) -> set[str]:
    index = ShardIndex(sorted(shards.glob("*.parquet")), progress=False)
    return set(sample_captions(index, 100))


def test_grids_take_the_datas_captions_unless_the_config_gives_prompts(split):
    train, heldout = split
    common = [f"data.shards=[{train}]", "data.num_workers=0"]

    def prompts(*overrides):
        config = load_config("tiny", [*common, *overrides])
        return sample_prompts(config, build_source(config))

    held, trained = captions_of(heldout), captions_of(train)
    assert held and trained and not held & trained
    assert set(prompts(f"eval.data=[{heldout}]")) == held  # every held-out caption (fewer than 8 of them)
    mine = prompts()  # no held-out data: 8 distinct captions of the training data, the same every time
    assert len(mine) == 8 == len(set(mine)) and set(mine) <= trained and mine == prompts()
    assert prompts("sampling.seed=1") != mine
    assert prompts("logging.sample_prompts=[a cup of tea]") == ["a cup of tea"]
    assert prompts("logging.sample_prompts=[]") == []  # no grid
    shapes = load_config("tiny")
    assert shapes.logging.sample_prompts is None
    assert sample_prompts(shapes, build_source(shapes)) == list(SHAPES_PROMPTS)  # the shapes world keeps its own


def test_a_run_records_its_prompts_and_resumes_with_them(split, tmp_path):
    from prx.train import Trainer

    train, heldout = split
    overrides = [f"data.shards=[{train}]", f"eval.data=[{heldout}]", "eval.every=0", "data.num_workers=0",
                 "logging.sample_every=2", "logging.sample_steps=1"]
    Trainer(tiny_config(*overrides, "train.steps=2"), tmp_path / "run").run()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["logging"]["sample_prompts"]
    assert set(saved) == captions_of(heldout) and (tmp_path / "run" / "samples" / "step_00000002.png").is_file()
    lines = []
    Trainer(tiny_config(*overrides, "train.steps=3"), tmp_path / "run", log=lines.append).run()
    assert not [line for line in lines if "changed config" in line and "sample_prompts" in line], lines
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["logging"]["sample_prompts"] == saved


def test_export_snippet_and_card_use_the_runs_prompts(tmp_path, capsys):
    run = tmp_path / "run"
    prompt = 'a "red" cup of coffee on a saucer'
    write_run(run, tiny_config("model.text_dim=384", f"logging.sample_prompts=['{prompt}', a rocket]"))
    code, out, err = run_cli(capsys, "export", "--format", "diffusers", "--checkpoint", run, "--out", tmp_path / "pipe")
    assert code == 0, err
    snippet = "\n".join(line.strip() for line in out.splitlines() if "pipe" in line and "=" in line)
    compile(snippet, "snippet", "exec")  # quotes in a caption stay valid Python
    assert json.dumps(prompt) in snippet and "a red circle" not in out
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert f"pipe({json.dumps(prompt)}" in card and '- "a rocket"' in card and "a red circle" not in card


def test_eval_without_data_on_a_run_not_on_shapes_says_what_to_pass(split, tmp_path, capsys):
    train, heldout = split
    run = tmp_path / "run"
    write_run(run, tiny_config("model.text_dim=384", f"data.shards=[{train}]", f"eval.data=[{heldout}]"))
    one_line_error(capsys, f"--data {heldout} --metrics val_loss", "eval", "--checkpoint", run)
    write_run(tmp_path / "plain", tiny_config("model.text_dim=384", f"data.shards=[{train}]"))
    one_line_error(capsys, "prx data split --out-heldout HELDOUT", "eval", "--checkpoint", tmp_path / "plain")


def test_inspect_takes_resolution_patch_and_batches_from_the_config(split, capsys):
    train, _ = split
    assert main(["data", "inspect", str(train), "--config", "speedrun-tiny"]) == 0
    out = capsys.readouterr().out
    assert "buckets at 64 px, patch 16" in out and "buckets at 128 px, patch 16" in out  # its two stages
    assert "speedrun-tiny stage 1: " in out and "speedrun-tiny stage 2: " in out
    assert main(["data", "inspect", str(train), "--config", "demo"]) == 0
    out = capsys.readouterr().out
    assert "buckets at 64 px, patch 16" in out and "warning: " in out and "use train.batch_size=" in out
    assert "(`prx data embed SHARDS --config demo` writes them)" in out
    assert main(["data", "inspect", str(train), "--config", "demo", "--resolution", "128"]) == 0
    assert "buckets at 128 px, patch 16" in capsys.readouterr().out  # an explicit option wins
    assert main(["data", "inspect", str(train)]) == 0
    assert "buckets at 512 px, patch 32" in capsys.readouterr().out  # no config: the recipe's
