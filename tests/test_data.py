"""Shards, converters, buckets and the loader, on fixtures made here (bad files included)."""

import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from prx.data.buckets import assign_bucket, make_buckets, resize_and_crop_box
from prx.data.convert import convert
from prx.data.imageio import BadImage, decode, probe
from prx.data.index import ShardIndex
from prx.data.loader import ShardLoader, ShardPlanner
from prx.data.mapping import Mapping
from prx.data.shards import caption_columns_of, expand_shards, read_shard_info, write_shard
from prx.errors import PrxError

# ------------------------------------------------------------------------------------------ fixtures


def image_bytes(width=40, height=24, mode="RGB", fmt="JPEG", color=(200, 30, 30), exif_orientation=None, **save):
    if mode in ("I;16",):
        image = Image.fromarray((np.linspace(0, 65535, width * height).reshape(height, width)).astype(np.uint16))
    else:
        fill = color if mode in ("RGB", "CMYK") else (color + (128,) if mode == "RGBA" else 128)
        if mode == "CMYK":
            fill = (0, 200, 200, 30)
        image = Image.new(mode, (width, height), fill)
    buffer = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        save["exif"] = exif
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """A noisy JPEG cut in the middle of its pixel data (the header is intact)."""
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def png_bomb(width=100_000, height=100_000) -> bytes:
    """A valid PNG header claiming 10 gigapixels, with no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    good = {
        "plain.jpg": (image_bytes(), "a red rectangle"),
        "sub/cmyk.jpg": (image_bytes(mode="CMYK"), "a cmyk image"),
        "gray.png": (image_bytes(mode="L", fmt="PNG"), "a gray image"),
        "alpha.png": (image_bytes(mode="RGBA", fmt="PNG"), "a half transparent image"),
        "deep.png": (image_bytes(mode="I;16", fmt="PNG"), "a 16-bit image"),
        "rotated.jpg": (image_bytes(40, 20, exif_orientation=6), "a photo stored sideways"),
        "old.bmp": (image_bytes(fmt="BMP"), "a bitmap"),
    }
    for name, (data, caption) in good.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(caption)
    (root / "json.png").write_bytes(image_bytes(fmt="PNG"))
    (root / "json.json").write_text(json.dumps({"caption": "a caption from json", "other": 3}))
    (root / "latin.jpg").write_bytes(image_bytes())
    (root / "latin.txt").write_bytes("un caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8: converted, counted
    bad = {
        "truncated.jpg": truncated_jpeg(),
        "empty.jpg": b"",
        "notimage.jpg": b"this is not an image at all",
        "bomb.png": png_bomb(),
        "nocaption.jpg": image_bytes(),
        "blankcaption.jpg": image_bytes(),
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
        if name not in ("nocaption.jpg", "blankcaption.jpg"):
            (root / name).with_suffix(".txt").write_text("caption of a bad file")
    (root / "blankcaption.txt").write_text("   \n")
    (root / "zero.png").write_bytes(b"")
    (root / "zero.txt").write_text("zero bytes")
    return root, len(good) + 2, {"truncated", "empty file", "not an image", "decompression bomb", "missing caption",
                                  "empty caption"}


# ------------------------------------------------------------------------------------------ images


def test_decoding_normalises_modes_and_orientation():
    for mode, fmt in (("CMYK", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("P", "PNG")):
        image = decode(image_bytes(mode=mode, fmt=fmt))
        assert image.mode == "RGB" and image.size == (40, 24)
    rgba = decode(image_bytes(mode="RGBA", fmt="PNG", color=(0, 0, 0)))  # half-transparent black on white
    assert 120 < np.asarray(rgba)[0, 0, 0] < 135
    sideways = image_bytes(40, 20, exif_orientation=6)
    assert probe(sideways)[:2] == (20, 40) and decode(sideways).size == (20, 40)
    # DCT-scaled JPEG decoding stops at the first scale that still covers the (upright) size asked for
    big = image_bytes(400, 200, exif_orientation=6)
    assert decode(big, at_least=(100, 200)).size == (100, 200)
    assert decode(big, at_least=(60, 120)).size == (100, 200)  # 1/4 would be 50×100: too small
    assert decode(image_bytes(400, 200, fmt="PNG"), at_least=(100, 50)).size == (400, 200)  # not JPEG: full size
    for data, reason in ((b"", "empty file"), (b"junk", "not an image"), (png_bomb(), "decompression bomb"),
                         (truncated_jpeg(), "truncated")):
        with pytest.raises(BadImage) as err:
            decode(data)
        assert err.value.reason == reason


# ------------------------------------------------------------------------------------------ shards


def test_schema_round_trip(tmp_path):
    rows = [{"id": f"s{i}", "image": image_bytes(), "width": 40, "height": 24, "format": "JPEG", "source": "t",
             "caption": f"caption {i}", "prompt": None if i % 2 else f"prompt {i}"} for i in range(70)]
    path = tmp_path / "a.parquet"
    write_shard(path, rows, ["caption", "prompt"], rows_per_group=32)
    table = pq.read_table(path)
    assert table.column_names == ["id", "image", "width", "height", "format", "source", "caption", "prompt"]
    assert table.schema.field("image").type == pa.binary() and table.schema.field("width").type == pa.int32()
    assert table.column("image")[5].as_py() == rows[5]["image"]  # bytes as stored
    assert table.column("prompt").to_pylist() == [r["prompt"] for r in rows]
    assert caption_columns_of(path) == ["caption", "prompt"]
    info = read_shard_info(path)
    assert info.num_rows == 70 and list(info.group_starts) == [0, 32, 64]
    assert expand_shards([str(tmp_path)]) == [path]


# ------------------------------------------------------------------------------------------ converters


def test_folder_conversion_with_bad_files(image_folder, tmp_path):
    root, n_good, reasons = image_folder
    out = tmp_path / "shards"
    manifest = convert("folder", [str(root)], out, Mapping(), workers=1, target_bytes=4000)
    assert manifest["complete"] and manifest["samples"] == n_good
    assert set(manifest["rejected"]["by_reason"]) == reasons
    assert manifest["rejected"]["count"] == 7 and manifest["latin1_captions"] == 1
    assert sum(manifest["aspect_ratio_histogram"].values()) == n_good
    assert len(manifest["shards"]) > 1  # the size target splits the output
    table = pq.read_table(expand_shards(str(out)))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["rotated.jpg"]["width"] == 20 and rows["rotated.jpg"]["height"] == 40
    assert rows["old.bmp"]["format"] == "PNG"  # re-encoded losslessly
    assert rows["json.png"]["caption"] == "a caption from json"
    assert rows["latin.jpg"]["caption"] == "un café crème"
    for r in rows.values():
        assert decode(r["image"]).size == (r["width"], r["height"])
    assert len((out / "rejected.jsonl").read_text().splitlines()) == 7


def test_conversion_resumes_and_refuses_other_inputs(image_folder, tmp_path):
    root, n_good, _ = image_folder
    out = tmp_path / "shards"
    first = convert("folder", [str(root)], out, Mapping(), target_bytes=4000)
    done = sorted((out / ".done").glob("*.json"))
    # a crash after writing task 1's shards but before its completion record
    done[1].unlink()
    again = convert("folder", [str(root)], out, Mapping(), target_bytes=4000)
    assert again["samples"] == first["samples"] == n_good and again["complete"]
    with pytest.raises(PrxError, match="other inputs"):
        convert("folder", [str(root)], out, Mapping(captions={"other": "other"}), target_bytes=4000)


def test_parallel_and_ranked_conversion_match_serial(image_folder, tmp_path):
    root, n_good, _ = image_folder
    serial = convert("folder", [str(root)], tmp_path / "serial", Mapping(), workers=1, target_bytes=4000)
    parallel = convert("folder", [str(root)], tmp_path / "parallel", Mapping(), workers=2, target_bytes=4000)

    def read(d):
        return sorted(pq.read_table(expand_shards(str(d))).to_pylist(), key=lambda r: r["id"])

    assert read(tmp_path / "serial") == read(tmp_path / "parallel") and parallel["samples"] == serial["samples"]
    for rank in (0, 1):
        convert("folder", [str(root)], tmp_path / "ranked", Mapping(), target_bytes=4000, rank=rank, world_size=2)
    assert read(tmp_path / "ranked") == read(tmp_path / "serial")


def test_webdataset_conversion(tmp_path):
    tar_path = tmp_path / "data-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("sub/a.jpg", image_bytes())
        add("sub/a.json", json.dumps({"prompt": "short", "enhanced_prompt": "a long detailed prompt"}).encode())
        add("sub/b.png", image_bytes(fmt="PNG"))
        add("sub/b.json", json.dumps({"prompt": "only a prompt"}).encode())
        add("sub/c.json", json.dumps({"prompt": "no image here"}).encode())
        add("sub/d.webp", image_bytes(fmt="WEBP"))
        add("sub/d.json", b"{not json")
    mapping = Mapping(captions={"prompt": "prompt", "enhanced_prompt": "enhanced_prompt"})
    manifest = convert("webdataset", [str(tmp_path)], tmp_path / "out", mapping)
    assert manifest["samples"] == 2
    assert manifest["rejected"]["by_reason"] == {"no image": 1, "malformed json caption": 1}
    rows = {r["id"]: r for r in pq.read_table(expand_shards(str(tmp_path / "out"))).to_pylist()}
    assert rows["sub/a"]["enhanced_prompt"] == "a long detailed prompt" and rows["sub/b"]["enhanced_prompt"] is None


def test_hf_parquet_with_preset_mapping(tmp_path):
    from prx.data.mapping import PRESETS

    images = [image_bytes(30 + i, 20) for i in range(4)]
    table = pa.table({
        "id": [f"aesthetics-{i:08d}" for i in range(4)],
        "image": pa.array([{"bytes": b, "path": None} for b in images],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "caption_detail": ["detail 0", "detail 1", None, "detail 3"],
        "caption_original": [None, "orig 1", None, ""],
        "score": [1.0, 2.0, 3.0, 4.0],
    })
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "fluxdb-00000.parquet")
    preset = PRESETS["flux-reason-6m"]
    manifest = convert("parquet", [str(tmp_path / "in")], tmp_path / "out",
                       Mapping(preset["image"], preset["captions"], preset["id"]))
    assert manifest["samples"] == 3 and manifest["rejected"]["by_reason"] == {"missing caption": 1}
    assert manifest["caption_columns"] == ["caption", "original"]
    rows = pq.read_table(expand_shards(str(tmp_path / "out"))).to_pylist()
    assert [r["id"] for r in rows] == ["aesthetics-00000000", "aesthetics-00000001", "aesthetics-00000003"]
    assert rows[1]["caption"] == "detail 1" and rows[1]["original"] == "orig 1" and rows[0]["original"] is None
    assert rows[2]["width"] == 33
    with pytest.raises(PrxError, match="has no column"):
        convert("parquet", [str(tmp_path / "in")], tmp_path / "out2", Mapping(captions={"llava": "caption"}))


def downloaded_parquet(path, n=24, with_sizes=False, rows_per_group=8):
    """A file shaped like FLUX-Reason-6M on the hub (or flux_generated with ``with_sizes``), bad rows
    included: 3 an undecodable blob, 7 no image, 11 no caption at all, 13 a truncated JPEG."""
    images = [image_bytes(48 + (i % 2) * 2, 48) for i in range(n)]  # one bucket: no leftovers
    images[3], images[7], images[13] = b"not an image", None, truncated_jpeg()
    columns = {
        "id": [f"row-{i}" for i in range(n)],
        "image": pa.array([None if b is None else {"bytes": b, "path": None} for b in images],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "caption_detail": [None if i in (5, 11) else f"detail {i}" for i in range(n)],
        "caption_original": [None if i == 11 else f"original {i}" for i in range(n)],
    }
    if with_sizes:
        columns["width"] = pa.array([48 + (i % 2) * 2 for i in range(n)], pa.int32())
        columns["height"] = pa.array([48] * n, pa.int32())
        columns["caption_caption"] = columns.pop("caption_detail")
        del columns["id"], columns["caption_original"]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=rows_per_group)
    return Path(path)


def test_downloaded_parquet_is_read_in_place(tmp_path, monkeypatch, prx_cache):
    from prx.data import inplace
    from prx.data.mapping import mapping_from

    path = downloaded_parquet(tmp_path / "hub" / "fluxdb-00000.parquet")
    mapping = mapping_from("flux-reason-6m")
    index = ShardIndex([path], mapping, progress=False)
    assert len(index) == 22 and index.unusable == 2  # rows 3 and 7 have no readable header
    assert index.caption_columns == ["caption", "original"]
    assert list(index.width[:3]) == [48, 50, 48] and list(index.height[:3]) == [48, 48, 48]
    assert len(list((prx_cache / "sizes").glob("*.npy"))) >= 1  # probed once, cached

    def no_probing(*args):
        raise AssertionError("sizes should come from the cache")

    monkeypatch.setattr(inplace, "_probe_sizes", no_probing)
    assert np.array_equal(ShardIndex([path], mapping, progress=False).width, index.width)

    loader = ShardLoader([path], patch=8, seed=0, caption_weights={"caption": 1.0, "original": 1.0}, num_workers=0,
                         mapping=mapping)
    loader.set_stage(0, 32, 2)
    seen = {}
    for _ in range(loader.batches_per_epoch):
        batch = loader.next()
        assert batch.images.dtype == torch.uint8 and batch.images.shape[0] == 2
        seen.update(zip(batch.ids, batch.captions))
    assert seen["row-0"] in ("detail 0", "original 0") and seen["row-5"] == "original 5"  # empty chosen column: fall back
    assert "row-11" not in seen and "row-13" not in seen
    assert dict(loader.skipped) == {"no caption": 1, "truncated": 1}


def test_downloaded_parquet_with_size_columns_and_no_id(tmp_path, prx_cache):
    from prx.data.mapping import mapping_from

    path = downloaded_parquet(tmp_path / "train-00000.parquet", with_sizes=True)
    index = ShardIndex([path], mapping_from("flux-generated"), progress=False)
    assert len(index) == 24 and index.unusable == 0 and index.width[5] == 50  # sizes from the file's columns
    loader = ShardLoader([path], patch=8, seed=0, caption_weights={}, num_workers=0, mapping=mapping_from("flux-generated"))
    loader.set_stage(0, 32, 4)
    batch = loader.next()
    assert all(i.startswith("train-00000.parquet:") for i in batch.ids)
    assert all(c.startswith("detail") for c in batch.captions)
    with pytest.raises(PrxError, match="has no column.*data.preset"):
        ShardIndex([path], mapping_from("midjourney-v6-llava"), progress=False)


def test_training_directly_on_downloaded_parquet(tmp_path):
    from conftest import tiny_config
    from prx.config import ConfigError
    from prx.train import Trainer

    downloaded_parquet(tmp_path / "hub" / "a.parquet")
    downloaded_parquet(tmp_path / "hub" / "b.parquet")
    data = ["data.dataset=parquet", f"data.shards=[{tmp_path / 'hub'}]", "data.preset=flux-reason-6m",
            "data.num_workers=1", "train.steps=3"]
    trainer = Trainer(tiny_config(*data), tmp_path / "run")
    trainer.run()
    assert trainer.data.state_dict()["batch"] > 0
    with pytest.raises(ConfigError, match="data.preset='nope' is unknown"):
        tiny_config(*data[:2], "data.preset=nope")
    with pytest.raises(ConfigError, match="set data.dataset=parquet"):
        tiny_config("data.dataset=shards", f"data.shards=[{tmp_path / 'hub'}]", "data.preset=flux-reason-6m")


# ------------------------------------------------------------------------------------------ buckets


def test_buckets_have_equal_tokens_and_cover_the_aspect_range():
    for resolution, patch in ((512, 32), (1024, 32), (256, 16)):
        buckets = make_buckets(resolution, patch)
        target = (resolution // patch) ** 2
        assert all(abs(b.tokens(patch) - target) / target < 0.07 for b in buckets)
        assert all(b.height % patch == 0 and b.width % patch == 0 for b in buckets)
        aspects = [b.aspect for b in buckets]
        assert min(aspects) >= 0.5 and max(aspects) <= 2.0 and min(aspects) < 0.6 and max(aspects) > 1.7
        assert any(b.height == b.width == resolution for b in buckets)
    buckets = make_buckets(512, 32)
    assert buckets[assign_bucket(1024, 1024, buckets)].aspect == 1.0
    assert buckets[assign_bucket(3000, 1000, buckets)].aspect == max(b.aspect for b in buckets)  # clamps to the widest
    bucket = buckets[assign_bucket(700, 500, buckets)]
    size, box = resize_and_crop_box(700, 500, bucket)
    assert box[2] - box[0] == bucket.width and box[3] - box[1] == bucket.height
    assert size[0] >= bucket.width and size[1] >= bucket.height


# ------------------------------------------------------------------------------------------ the loader


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """300 samples with varied aspect ratios and two caption columns, in 4 shards."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    n = 0
    for s in range(4):
        rows = []
        for _ in range(75):
            w, h = int(rng.integers(32, 97)), int(rng.integers(32, 97))
            rows.append({"id": f"m{n}", "image": image_bytes(w, h, color=tuple(int(c) for c in rng.integers(0, 255, 3))),
                         "width": w, "height": h, "format": "JPEG", "source": "test",
                         "a": f"caption a {n}", "b": f"caption b {n}" if n % 10 else ""})
            n += 1
        write_shard(root / f"part-{s}.parquet", rows, ["a", "b"], rows_per_group=8)
    return sorted(root.glob("*.parquet"))


def test_rank_plans_are_disjoint_complete_and_equally_long(mixed_shards):
    index = ShardIndex(mixed_shards)
    for world in (1, 2, 3):
        plans = [ShardPlanner(index, 64, 16, 4, r, world, seed=0, stage=0).plan(0) for r in range(world)]
        assert len({len(p) for p in plans}) == 1
        taken = np.concatenate([s for plan in plans for _, s in plan])
        assert len(taken) == len(set(taken.tolist()))  # no sample twice
        # all but the per-bucket leftovers (< batch size per bucket and rank) are used
        n_buckets = len(make_buckets(64, 16))
        assert len(taken) >= len(index) - world * n_buckets * 4 - world * 4 * 8
    planner = ShardPlanner(index, 64, 16, 4, 0, 1, seed=0, stage=0)
    for bucket, samples in planner.plan(0):
        assert set(planner.bucket_of[samples].tolist()) == {bucket}
    assert [s.tolist() for _, s in planner.plan(0)] != [s.tolist() for _, s in planner.plan(1)]  # reshuffled per epoch


def test_batches_have_one_shape_and_weighted_captions(mixed_shards):
    loader = ShardLoader(mixed_shards, patch=16, seed=0, caption_weights={"a": 0.8, "b": 0.2}, num_workers=0)
    loader.set_stage(0, 64, 4)
    counts = Counter()
    for _ in range(150):
        batch = loader.next()
        b, c, h, w = batch.images.shape
        assert batch.images.dtype == torch.uint8 and c == 3 and h % 16 == 0 and w % 16 == 0
        assert abs((h // 16) * (w // 16) - 16) <= 1
        for caption in batch.captions:
            counts[caption.split()[1]] += 1
    share_a = counts["a"] / sum(counts.values())
    # 80% a; b is empty for one sample in ten, which then falls back to a: 0.8 + 0.2·0.1 = 0.82
    assert abs(share_a - 0.82) < 0.04


def test_exact_resume_with_a_different_number_of_workers(mixed_shards):
    def make(workers):
        loader = ShardLoader(mixed_shards, patch=16, seed=3, caption_weights={"a": 0.5, "b": 0.5}, num_workers=workers)
        loader.set_stage(0, 64, 4)
        return loader

    reference = make(0)
    expected = [reference.next() for _ in range(30)]  # crosses into epoch 1 (~17 batches per epoch)
    first = make(2)
    for _ in range(11):
        first.next()
    state = first.state_dict()
    resumed = make(0)
    resumed.load_state_dict(state)
    resumed.set_stage(0, 64, 4)
    for want in expected[11:]:
        got = resumed.next()
        assert got.ids == want.ids and got.captions == want.captions and torch.equal(got.images, want.images)


def test_bad_samples_are_replaced_and_counted(tmp_path):
    rows = [{"id": f"s{i}", "image": image_bytes(), "width": 40, "height": 24, "format": "JPEG", "source": "t",
             "caption": f"c{i}"} for i in range(8)]
    rows[3]["image"] = b"corrupt bytes"
    rows[5]["image"] = truncated_jpeg()
    write_shard(tmp_path / "s.parquet", rows, ["caption"])
    loader = ShardLoader([tmp_path / "s.parquet"], patch=8, seed=0, caption_weights={}, num_workers=0)
    loader.set_stage(0, 32, 8)
    batch = loader.next()
    assert batch.images.shape[0] == 8 and "s3" not in batch.ids and "s5" not in batch.ids
    assert sum(loader.skipped.values()) == 2 and set(loader.skipped) == {"not an image", "truncated"}


def test_precomputed_embeddings_match_online_encoding(tmp_path, text_encoder):
    from prx.data.embed import embed_shards
    from prx.data.shapes import write_shards
    from prx.data.shards import encoder_tag

    paths = write_shards(tmp_path, 12, resolution=32, per_shard=6)
    stats = embed_shards(paths, text_encoder, batch_size=5, progress=False)
    assert stats["captions"] == 12
    assert embed_shards(paths, text_encoder, progress=False)["skipped_existing"] == 2  # resumable
    tag = encoder_tag(text_encoder.name, text_encoder.max_length)
    assert encoder_tag(text_encoder.name, text_encoder.max_length, 3) != tag  # text.num_layers: other tokens
    loader = ShardLoader(paths, patch=16, seed=0, caption_weights={}, num_workers=0, embedding_tag=tag)
    loader.set_stage(0, 32, 4)
    batch = loader.next()
    online = text_encoder.encode(batch.captions)
    length = min(online.embeds.shape[1], batch.text.embeds.shape[1])
    assert torch.equal(batch.text.mask[:, :length], online.mask[:, :length])
    assert torch.allclose(batch.text.embeds[:, :length].float(), online.embeds[:, :length], atol=2e-2)
    assert loader.empty_embedding.shape[0] >= 1
    # training on them: the loader pads a batch to its longest caption, and to text.min_length as the encoder pads online
    # encodings (one caption length: what CUDA graphs need)
    from conftest import tiny_config
    from prx.train import Trainer

    data = ["data.dataset=shards", f"data.shards=[{tmp_path}]", "data.num_workers=0", "data.resolution=32"]
    lengths = {}
    for min_length in (0, 48):
        trainer = Trainer(tiny_config(*data, f"text.min_length={min_length}", "train.batch_size=4"),
                          tmp_path / f"run{min_length}")
        trainer.setup()
        assert trainer.data.empty_embedding is not None  # the precomputed encodings, not the encoder
        lengths[min_length] = trainer.train_step(0).text_length
        trainer.close()
    assert lengths == {0: batch.text.embeds.shape[1], 48: 48} and lengths[0] < 48


def test_shapes_world_as_shards(tmp_path):
    from prx.data.shapes import ShapesWorld, write_shards

    write_shards(tmp_path, 20, resolution=32, seed=4)
    world = ShapesWorld(32, seed=4)
    table = pq.read_table(expand_shards(str(tmp_path))).to_pylist()
    assert [r["caption"] for r in table] == [world.scene(i).caption for i in range(20)]
    image = np.asarray(decode(table[7]["image"]))
    assert np.array_equal(image, np.asarray(world[7][0].add(1).mul(127.5).round().byte().permute(1, 2, 0)))


def test_training_on_shards_resumes_exactly(tmp_path):
    from conftest import tiny_config
    from prx.data.shapes import write_shards
    from prx.train import Trainer

    write_shards(tmp_path / "shards", 200, resolution=48, per_shard=50)
    data = ["data.dataset=shards", f"data.shards=[{tmp_path / 'shards'}]", "data.num_workers=2"]
    full = Trainer(tiny_config("train.steps=8", *data), tmp_path / "full")
    full.run()
    Trainer(tiny_config("train.steps=4", *data), tmp_path / "split").run()
    rest = Trainer(tiny_config("train.steps=8", *data[:-1], "data.num_workers=0"), tmp_path / "split", resume=True)
    rest.run()
    assert rest.data.state_dict()["batch"] == full.data.state_dict()["batch"]
    for a, b in zip(full.model.parameters(), rest.model.parameters()):
        assert torch.equal(a, b)


def test_caption_dropout_gives_dropped_rows_the_empty_captions_precomputed_encoding():
    from prx.data.sources import DataBatch
    from prx.text import TextBatch

    embeds, mask = torch.randn(3, 5, 4), torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    empty = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)  # (tokens, dim), as sidecars hold it
    batch = DataBatch(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), ["a", "b", "c"], text=TextBatch(embeds, mask))
    captions = batch.drop_captions(torch.tensor([False, True, False]), empty)
    assert captions == ["a", "", "c"]
    assert torch.equal(batch.text.embeds[1, :2], torch.from_numpy(empty)) and batch.text.mask[1].tolist() == [1, 1, 0, 0, 0]
    assert torch.equal(batch.text.embeds[[0, 2]], embeds[[0, 2]]) and torch.equal(batch.text.mask[[0, 2]], mask[[0, 2]])
    online = DataBatch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["x"])  # no encodings: only the captions change
    assert online.drop_captions(torch.tensor([True]), None) == [""] and online.text is None
