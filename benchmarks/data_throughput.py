"""Data-path throughput and memory (a benchmark, not a test).

1. decode + resize + centre-crop per CPU core (one process, one thread) at 512 and 1024 px,
   from 1024×1024 JPEG and WebP sources (the recipe's datasets are mostly 1024² images);
2. `prx data convert` throughput from an image folder, with 1 and 2 worker processes;
3. the training loader's resident memory (main process + workers) over many epochs;
4. the loader on converted shards vs the same images in a downloaded-style Parquet file read in
   place (data.dataset=parquet: 100-row groups, the image as a {bytes, path} struct).

    python benchmarks/data_throughput.py            # ~3 minutes on 2 cores
"""

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from prx.data.buckets import make_buckets, resize_and_crop_box
from prx.data.convert import convert
from prx.data.imageio import decode
from prx.data.loader import ShardLoader
from prx.data.mapping import Mapping, mapping_from
from prx.data.shards import expand_shards


def natural_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth structure plus texture, so codecs see realistic file sizes (about 150-250 KB as JPEG q90)."""
    low = rng.random((size // 32, size // 32, 3))
    image = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float64)
    image += rng.normal(0, 12, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48, help="source images per format")
    ap.add_argument("--epochs", type=int, default=12, help="loader epochs for the memory check")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rng = np.random.default_rng(0)
    sources = [natural_image(rng, 1024) for _ in range(args.images)]

    print("1. decode + resize + crop, one process (images/s per core)")
    for fmt in ("JPEG", "WEBP"):
        files = [encode(a, fmt) for a in sources]
        kib = np.mean([len(f) for f in files]) / 1024
        for resolution in (512, 1024):
            bucket = next(b for b in make_buckets(resolution, 32) if b.width == b.height)  # square sources
            rates = {}
            for scaled in (False, True):
                start = time.perf_counter()
                for data in files:
                    cover = resize_and_crop_box(1024, 1024, bucket)[0] if scaled else None
                    image = decode(data, at_least=cover)
                    size, box = resize_and_crop_box(image.width, image.height, bucket)
                    np.asarray(image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None).crop(box))
                rates[scaled] = len(files) / (time.perf_counter() - start)
            rate = rates[True]
            print(f"   {fmt:<5} 1024² source ({kib:.0f} KiB) → {resolution} px: {rate:6.1f} images/s per core "
                  f"(without DCT-scaled decoding {rates[False]:.1f})"
                  + (f"; 300 images/s needs {int(np.ceil(300 / rate))} loader processes" if resolution == 512 else ""))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "folder"
        folder.mkdir()
        for i, array in enumerate(sources * 2):
            (folder / f"{i:04d}.jpg").write_bytes(encode(array, "JPEG"))
            (folder / f"{i:04d}.txt").write_text(f"caption {i}")
        n = len(sources) * 2
        print("2. prx data convert from an image folder (full decode check)")
        for workers in (1, 2):
            start = time.perf_counter()
            convert("folder", [str(folder)], Path(tmp) / f"out{workers}", Mapping(), workers=workers,
                    target_bytes=4 * 2**20, progress=False)
            print(f"   {workers} worker(s): {n / (time.perf_counter() - start):6.1f} images/s")

        print("3. loader memory over a long run (2 workers, 512 px, batch 8)")
        loader = ShardLoader(expand_shards(str(Path(tmp) / "out1")), patch=32, seed=0, caption_weights={}, num_workers=2)
        loader.set_stage(0, 512, 8)
        per_epoch = loader.batches_per_epoch
        samples = []
        start = time.perf_counter()
        for i in range(per_epoch * args.epochs):
            loader.next()
            if i % per_epoch == per_epoch - 1:
                pid = os.getpid()
                samples.append(rss_mib(pid) + sum(rss_mib(c) for c in children(pid)))
        elapsed = time.perf_counter() - start
        print(f"   {per_epoch * args.epochs * 8} images in {elapsed:.1f} s "
              f"({per_epoch * args.epochs * 8 / elapsed:.1f} images/s); RSS after each epoch (MiB): "
              f"{', '.join(f'{m:.0f}' for m in samples)}")
        print(f"   growth from epoch 2 to the last: {samples[-1] - samples[1]:+.0f} MiB")

        print("4. loader throughput, 2 workers, 512 px, batch 8, two epochs: converted shards vs read in place")
        jpegs = [encode(a, "JPEG") for a in sources] * 4
        hub = Path(tmp) / "hub"
        hub.mkdir()
        struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        pq.write_table(pa.table({"image": pa.array([{"bytes": b, "path": None} for b in jpegs], struct),
                                 "caption": [f"caption {i}" for i in range(len(jpegs))]}),
                       hub / "train-00000.parquet", row_group_size=100)  # as the `datasets` library writes images
        convert("parquet", [str(hub)], Path(tmp) / "converted", Mapping(), workers=1, target_bytes=2**30, progress=False)
        os.environ["PRX_CACHE"] = str(Path(tmp) / "cache")
        for name, paths, mapping in (("converted shards", expand_shards(str(Path(tmp) / "converted")), None),
                                     ("read in place", [hub / "train-00000.parquet"], mapping_from())):
            start = time.perf_counter()
            loader = ShardLoader(paths, patch=32, seed=0, caption_weights={}, num_workers=2, mapping=mapping)
            ready = time.perf_counter() - start
            loader.set_stage(0, 512, 8)
            count = 2 * loader.batches_per_epoch
            start = time.perf_counter()
            for _ in range(count):
                loader.next()
            rate = count * 8 / (time.perf_counter() - start)
            print(f"   {name:<17} {rate:6.1f} images/s (index built in {ready:.2f} s)")


if __name__ == "__main__":
    main()
