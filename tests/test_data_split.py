"""`prx data split`: a held-out set chosen by a hash of each sample's id — the same samples whatever the
order, the sharding or the data added later — written as prx shards that train and evaluate."""

import json
import random

import pyarrow.parquet as pq
import pytest

from photos import write_photo_folder
from prx.cli import main
from prx.data.shards import caption_columns_of, expand_shards, write_shard
from prx.data.split import heldout_score, is_heldout, split_shards


def rows_of(directory):
    """id → the row as stored, over every shard of a directory."""
    rows = {}
    for path in expand_shards([str(directory)]):
        for row in pq.read_table(path).to_pylist():
            rows[row["id"]] = row
    return rows


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    write_photo_folder(root / "folder", copies=2)  # 38 photos of many aspect ratios
    assert main(["data", "convert", "--from", "folder", str(root / "folder"), "--out", str(root / "all"),
                 "--workers", "1"]) == 0
    return root / "all"


def test_the_rule_is_a_fixed_function_of_the_id_and_respects_the_fraction():
    ids = [f"photos/img_{i:05d}.jpg" for i in range(20_000)]
    for fraction in (0.01, 0.05, 0.2, 0.5):
        held = sum(is_heldout(i, fraction) for i in ids)
        assert abs(held / len(ids) - fraction) < 4 * (fraction * (1 - fraction) / len(ids)) ** 0.5 + 1e-3
    # sha256, not Python's salted hash: the same number in every process and on every machine
    assert heldout_score("a", 0) == int.from_bytes(__import__("hashlib").sha256(b"0:a").digest()[:8], "big") / 2**64
    # a larger fraction holds out a superset; another seed another set
    small = {i for i in ids if is_heldout(i, 0.05)}
    assert small <= {i for i in ids if is_heldout(i, 0.2)}
    assert small != {i for i in ids if is_heldout(i, 0.05, seed=1)}


def test_split_copies_every_row_unchanged_into_one_of_two_sets(photo_shards, tmp_path, capsys):
    train, heldout = tmp_path / "train", tmp_path / "heldout"
    assert main(["data", "split", str(photo_shards), "--fraction", "0.3", "--out-train", str(train),
                 "--out-heldout", str(heldout)]) == 0
    assert "38 samples" in capsys.readouterr().out
    source, a, b = rows_of(photo_shards), rows_of(train), rows_of(heldout)
    assert set(a) | set(b) == set(source) and not set(a) & set(b)
    assert set(b) == {i for i in source if is_heldout(i, 0.3)} and 0 < len(b) < len(source)
    assert all((a | b)[i] == row for i, row in source.items())  # bytes, size, captions: as converted
    for out, role in ((train, "train"), (heldout, "heldout")):
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["split"]["role"] == role and manifest["split"]["fraction"] == 0.3
        assert manifest["samples"] == len(rows_of(out)) and manifest["caption_columns"] == ["caption"]
        assert all(caption_columns_of(p) == ["caption"] for p in expand_shards([str(out)]))
    # the same command again does nothing; another fraction into the same place is refused
    assert main(["data", "split", str(photo_shards), "--fraction", "0.3", "--out-train", str(train),
                 "--out-heldout", str(heldout)]) == 0
    assert "already split" in capsys.readouterr().out
    assert main(["data", "split", str(photo_shards), "--fraction", "0.5", "--out-train", str(train),
                 "--out-heldout", str(heldout)]) == 2
    assert "already holds other shards" in capsys.readouterr().err


def test_the_same_samples_are_held_out_whatever_the_order_sharding_or_added_data(photo_shards, tmp_path):
    source = list(rows_of(photo_shards).values())
    first = split_shards([str(photo_shards)], 0.3, tmp_path / "a" / "train", tmp_path / "a" / "heldout")
    assert not first["already_done"]
    held = set(rows_of(tmp_path / "a" / "heldout"))
    # the same rows re-sharded: shuffled into 3 files of another row-group size
    random.Random(0).shuffle(source)
    resharded = tmp_path / "resharded"
    resharded.mkdir()
    for k in range(3):
        write_shard(resharded / f"x-{k}.parquet", source[k::3], ["caption"], rows_per_group=5)
    split_shards([str(resharded)], 0.3, tmp_path / "b" / "train", tmp_path / "b" / "heldout")
    assert set(rows_of(tmp_path / "b" / "heldout")) == held
    # half of the data alone: its samples land where they landed with all of it
    half = tmp_path / "half"
    half.mkdir()
    write_shard(half / "h.parquet", source[: len(source) // 2], ["caption"])
    split_shards([str(half)], 0.3, tmp_path / "c" / "train", tmp_path / "c" / "heldout")
    kept = {r["id"] for r in source[: len(source) // 2]}
    assert set(rows_of(tmp_path / "c" / "heldout")) == held & kept


def test_bad_splits_are_one_line_errors(photo_shards, tmp_path, capsys):
    cases = [
        (["--fraction", "1.5", "--out-train", str(tmp_path / "t"), "--out-heldout", str(tmp_path / "h")], "between 0 "
                                                                                                          "and 1"),
        (["--fraction", "0.1", "--out-train", str(tmp_path / "x"), "--out-heldout", str(tmp_path / "x")], "two different"),
        (["--fraction", "0.1", "--out-train", str(photo_shards / "train"), "--out-heldout", str(tmp_path / "h")],
         "overlaps input"),
    ]
    for options, message in cases:
        assert main(["data", "split", str(photo_shards), *options]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["data", "split", str(tmp_path / "nothing"), "--fraction", "0.1", "--out-train", str(tmp_path / "t"),
                 "--out-heldout", str(tmp_path / "h")]) == 2
    assert "no shards found" in capsys.readouterr().err


def test_both_outputs_train(photo_shards, tmp_path):
    train, heldout = tmp_path / "train", tmp_path / "heldout"
    split_shards([str(photo_shards)], 0.3, train, heldout)
    for data in (train, heldout):
        run = tmp_path / f"run-{data.name}"
        assert main(["train", "tiny", "data.dataset=shards", f"data.shards=[{data}]", "data.num_workers=0",
                     "train.steps=2", "train.batch_size=2", "--out", str(run)]) == 0
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows and rows[-1]["step"] == 2
    # and the held-out set evaluates a run that never saw it
    assert main(["eval", "--checkpoint", str(tmp_path / "run-train"), "--data", str(heldout), "--num-samples", "2",
                 "--metrics", "val_loss", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]["val_loss"]["num_samples"] == 2
