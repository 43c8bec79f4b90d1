"""Small datasets: fewer row groups than ranks, a batch size larger than the data. Each rank then takes rows of every
global batch (``data.sharding: rows``, the default for data of at most ``data.shuffle_window`` row groups), so the
batches are the same for any world size; a batch that cannot be filled says which batch size can."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from photos import load_photos
from prx.config import load_config
from prx.data.index import ShardIndex
from prx.data.loader import ShardPlanner
from prx.data.shards import write_shard
from prx.errors import PrxError

BIN = Path(sys.executable).parent


def photo_shard(path: Path, count: int) -> Path:
    """``count`` of the real photos (several sizes and aspect ratios) in one shard of one row group."""
    import io

    rows = []
    for name, (image, caption) in sorted(load_photos().items())[:count]:
        buffer = io.BytesIO()
        picture = Image.fromarray(image).convert("RGB")
        picture.save(buffer, format="JPEG", quality=90)
        rows.append({"id": name, "image": buffer.getvalue(), "width": picture.width, "height": picture.height,
                     "format": "JPEG", "source": name, "caption": caption})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_shard(path, rows, ["caption"], rows_per_group=32)
    return path


@pytest.fixture(scope="module")
def seventeen(tmp_path_factory) -> Path:
    return photo_shard(tmp_path_factory.mktemp("small") / "photos.parquet", 17)


def test_rows_sharding_gives_every_world_size_the_same_batches(seventeen):
    index = ShardIndex([seventeen])
    assert len(index) == 17 and len(index.groups) == 1
    for epoch in (0, 1):
        one = [s.tolist() for _, s in ShardPlanner(index, 48, 16, 4, 0, 1, 0, 0, split_rows=True).plan(epoch)]
        assert one and all(len(s) == 4 for s in one)
        for world in (2, 4):
            plans = [ShardPlanner(index, 48, 16, 4 // world, r, world, 0, 0, split_rows=True).plan(epoch)
                     for r in range(world)]
            joined = [np.concatenate([plan[k][1] for plan in plans]).tolist() for k in range(len(plans[0]))]
            assert joined == one, (epoch, world)  # rank r holds rows r·B/W … (r+1)·B/W of the global batch
    # on one rank both shardings are the same plan: a 1-process run does not change
    assert [s.tolist() for _, s in ShardPlanner(index, 48, 16, 4, 0, 1, 0, 0).plan(1)] == one
    # row-group sharding on 2 ranks: rank 1 has no row group, so no batch
    assert not ShardPlanner(index, 48, 16, 2, 1, 2, 0, 0, split_rows=False).plan(0)


def test_a_batch_the_data_cannot_fill_says_which_one_can(tmp_path, seventeen):
    from prx.data.sources import build_source

    shard = photo_shard(tmp_path / "thirteen" / "photos.parquet", 13)
    config = load_config("demo", [f"data.shards=[{shard}]", "data.num_workers=0"])  # the demo's batch of 64
    with pytest.raises(PrxError) as error:
        build_source(config)
    message = str(error.value)
    assert "\n" not in message and message.startswith("13 samples give no full batch of 64 at 64 px")
    assert "use train.batch_size=4" in message, message
    build_source(load_config("demo", [f"data.shards=[{shard}]", "data.num_workers=0", "train.batch_size=4"]))
    # per stage, with the stage's key
    stages = "train.stages=[{resolution: 64, steps: 2, batch_size: 4}, {resolution: 128, steps: 2, batch_size: 32}]"
    with pytest.raises(PrxError, match=r"train.stages\[1\].batch_size=2 \(14 of the 17 "):
        build_source(load_config("tiny", [f"data.shards=[{seventeen}]", "data.num_workers=0", stages]))
    # row groups of their own on 2 ranks: the one that gets none is told to take rows
    config = load_config("tiny", [f"data.shards=[{seventeen}]", "data.num_workers=0", "data.sharding=row_groups"])
    with pytest.raises(PrxError, match="data.sharding=rows"):
        build_source(config, rank=1, world=2)
    build_source(load_config("tiny", [f"data.shards=[{seventeen}]", "data.num_workers=0"]), rank=1, world=2)


@pytest.mark.slow
def test_seventeen_photos_in_one_row_group_train_alike_on_one_and_two_ranks(seventeen, tmp_path):
    from test_distributed import COMMON, trajectory

    args = ["train", "tiny", f"data.shards=[{seventeen}]", "data.num_workers=0", "train.steps=6", *COMMON]
    runs = {}
    for name, launcher in (("one", [str(BIN / "prx")]),
                           ("two", [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "prx.cli"])):
        runs[name] = tmp_path / name
        done = subprocess.run([*launcher, *args, "--out", str(runs[name])], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    one, two = trajectory(runs["one"]), trajectory(runs["two"])
    assert one.keys() == two.keys() == set(range(1, 7))
    for step in one:  # the same samples, captions, noise and timesteps: the same losses
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
