"""Quality of a real-data run: generated images against held-out real images from shards.

1. ``num_samples`` images are picked from the shards by a seeded permutation (then taken in file
   order, so nearby rows are read together), each with one caption (``caption_column``, or the
   shards' first caption column; another one where it is empty).
2. The real images are resized to cover ``resolution`` and centre-cropped to that square (PIL
   bicubic, as the training loader does); each caption is sampled once at that resolution, image
   p from the noise of ``seed + p``; generated images go through the very same resize function
   (a no-op when they already have the size). Every extractor then resizes real and generated
   images alike to its own input size.
3. Samples are processed in fixed batches of ``batch_size`` consecutive positions; under torchrun
   rank r takes batches r, r + W, … — every sample is generated exactly once, shares may be
   uneven, nothing is padded, and every sample sees the same batch whatever the world size.
   The metrics' states are reduced across ranks in ``compute()``, which every rank calls.

A sample whose image cannot be decoded, or that has no caption, is skipped and counted (on
every world size alike).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from prx.config.sampling import SamplingConfig
from prx.data.buckets import Bucket, resize_and_crop_box
from prx.data.imageio import BadImage, decode
from prx.data.index import ShardIndex
from prx.data.shards import caption_columns_of, expand_shards
from prx.errors import PrxError
from prx.metrics import METRICS, parse_metrics
from prx.metrics.clip_score import CLIPScore
from prx.metrics.cmmd import CMMD
from prx.metrics.extractors import CLIP_ID, DINOV2_ID, ClipExtractor, DinoV2Extractor, Extractor, InceptionExtractor
from prx.metrics.fd_dinov2 import FDDinoV2
from prx.metrics.fid import FID
from prx.metrics.val_loss import ValLoss

SAMPLING_METRICS = ("fid", "fd_dinov2", "cmmd", "clip_score")
EXTRACTOR_OF = {"fid": "inception", "fd_dinov2": "dinov2", "cmmd": "clip", "clip_score": "clip"}

try:
    _BICUBIC = Image.Resampling.BICUBIC
except AttributeError:  # pragma: no cover
    _BICUBIC = 3


def resize_center_crop(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """An RGB image → uint8 (size, size, 3): resized (bicubic, aspect kept) to cover the square, then
    centre-cropped. Real and generated images both go through this one function."""
    if isinstance(image, np.ndarray):
        if image.shape[:2] == (size, size):
            return image
        image = Image.fromarray(image)
    (width, height), box = resize_and_crop_box(image.width, image.height, Bucket(size, size))
    if (width, height) != image.size:
        image = image.resize((width, height), resample=_BICUBIC, reducing_gap=None)
    return np.asarray(image.crop(box))


# --------------------------------------------------------------------------------------------
# The held-out set
# --------------------------------------------------------------------------------------------


@dataclass
class HeldOutSet:
    """``num_samples`` samples of the shards, chosen by ``seed``, in file order."""

    index: object  # prx.data.loader.ShardIndex
    samples: np.ndarray  # sample numbers of the index, in evaluation order
    caption_columns: list[str]  # the chosen column first
    paths: list[Path]

    @classmethod
    def open(cls, shards: str | list[str], num_samples: int, seed: int = 0, caption_column: str | None = None,
             mapping=None) -> "HeldOutSet":
        if not shards:
            raise PrxError("no --data given: point it to a directory of held-out prx shards")
        paths = expand_shards(shards)
        index = ShardIndex(paths, mapping, progress=False)
        if len(index) == 0:
            raise PrxError(f"the shards at {shards} hold no samples: point --data to held-out prx shards")
        if num_samples < 1:
            raise PrxError(f"--num-samples {num_samples} must be at least 1")
        if num_samples > len(index):
            raise PrxError(f"--num-samples {num_samples} is more than the {len(index)} samples in {shards}: "
                           f"lower it or add held-out data")
        columns = list(index.caption_columns)
        if not columns:
            raise PrxError(f"the shards at {shards} have no caption column in common")
        if mapping is None:  # the converter's order (e.g. caption before enhanced_prompt), not alphabetical
            columns = [c for c in caption_columns_of(paths[0]) if c in columns]
        if caption_column is not None:
            if caption_column not in columns:
                raise PrxError(f"caption column '{caption_column}' is not in every shard: the shards have "
                               f"{', '.join(columns)}")
            columns = [caption_column] + [c for c in columns if c != caption_column]
        chosen = np.random.default_rng([int(seed), 0xE7A1]).permutation(len(index))[:num_samples]
        return cls(index, np.sort(chosen), columns, paths)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, positions: range, size: int, cache: "_GroupCache"):
        """(images (size², uint8 HWC), captions, positions, skipped reasons) of the loadable samples
        among ``positions``."""
        idx = self.index
        images, captions, kept, skipped = [], [], [], collections.Counter()
        columns = idx.read_columns(self.caption_columns)
        for p in positions:
            sample = int(self.samples[p])
            shard, row, group = int(idx.shard[sample]), int(idx.row[sample]), int(idx.group[sample])
            local_group = idx.groups[group][1]
            table = cache.get(idx.paths[shard], local_group, columns)
            r = row - idx.group_start[(shard, local_group)]
            caption = next((c for c in (idx.caption(table, r, name) for name in self.caption_columns) if c), None)
            try:
                if caption is None:
                    raise BadImage("no caption")
                image = decode(idx.image(table, r))
            except BadImage as e:
                skipped[e.reason] += 1
                continue
            images.append(resize_center_crop(image, size))
            captions.append(caption)
            kept.append(p)
        return images, captions, kept, skipped


class _GroupCache:
    """The row groups read last (a batch of consecutive positions touches one or two)."""

    def __init__(self, keep: int = 4):
        import pyarrow.parquet as pq

        self._pq, self.keep = pq, keep
        self.items: collections.OrderedDict = collections.OrderedDict()

    def get(self, path: Path, group: int, columns: list[str]):
        key = (path, group, tuple(columns))
        if key not in self.items:
            self.items[key] = self._pq.ParquetFile(path).read_row_group(group, columns=columns)
            while len(self.items) > self.keep:
                self.items.popitem(last=False)
        return self.items[key]


# --------------------------------------------------------------------------------------------
# Extractors and metrics
# --------------------------------------------------------------------------------------------


def build_extractors(metrics: list[str], inception_weights: str | None = None, clip_model: str = CLIP_ID,
                     dino_model: str = DINOV2_ID, device: torch.device | str = "cpu") -> dict[str, Extractor]:
    """The feature extractors the metrics need, each loaded once (CLIP serves CMMD and CLIP score).
    A missing one is a one-line PrxError — call this before any sampling."""
    needed = {EXTRACTOR_OF[m] for m in metrics if m in EXTRACTOR_OF}
    out: dict[str, Extractor] = {}
    if "inception" in needed:
        out["inception"] = InceptionExtractor(inception_weights)
    if "dinov2" in needed:
        out["dinov2"] = DinoV2Extractor(dino_model)
    if "clip" in needed:
        out["clip"] = ClipExtractor(clip_model, text="clip_score" in metrics)
    return {k: v.to(device) for k, v in out.items()}


def check_sample_count(names: list[str], n: int) -> None:
    if n < 2 and any(m in ("fid", "fd_dinov2") for m in names):
        raise PrxError("FID and FD-DINOv2 need at least 2 samples (and thousands to mean much): raise --num-samples")


def build_metrics(names: list[str], extractors: dict[str, Extractor], pipeline=None, seed: int = 0) -> dict:
    made = {}
    for name in names:
        if name == "fid":
            made[name] = FID(extractors["inception"])
        elif name == "fd_dinov2":
            made[name] = FDDinoV2(extractors["dinov2"])
        elif name == "cmmd":
            made[name] = CMMD(extractors["clip"])
        elif name == "clip_score":
            made[name] = CLIPScore(extractors["clip"])
        elif name == "val_loss":
            made[name] = ValLoss(pipeline.model, pipeline.text_encoder, pipeline.config.objective, seed=seed,
                                 autocast_dtype=pipeline.autocast)
    return made


def _plain(value):
    """Tensors in a (nested) result → Python floats / ints."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return int(value)
        return float(value) if torch.isfinite(value) else None  # an empty bin: null in JSON, not NaN
    return value


def _generate(pipeline, captions: list[str], positions: list[int], seed: int, resolution: int,
              sampling: SamplingConfig):
    """Generated uint8 images (B, H, W, 3); image p starts from the noise of seed + p (contiguous runs of
    positions share one ``generate`` call, so a skipped sample does not shift the others' noise)."""
    out, start = [], 0
    while start < len(positions):
        end = start + 1
        while end < len(positions) and positions[end] == positions[end - 1] + 1:
            end += 1
        out.append(pipeline.generate(captions[start:end], sampling, seed=seed + positions[start], resolution=resolution,
                                     batch_size=end - start))
        start = end
    return torch.cat(out).numpy()


def _chw(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def evaluate_real(pipeline, shards, metrics=tuple(METRICS), num_samples: int = 1000, seed: int = 0,
                  batch_size: int = 16, resolution: int | None = None, sampling: SamplingConfig | None = None,
                  extractors: dict[str, Extractor] | None = None, inception_weights: str | None = None,
                  clip_model: str = CLIP_ID, dino_model: str = DINOV2_ID, caption_column: str | None = None,
                  heldout: HeldOutSet | None = None, progress=None) -> dict:
    """Sample ``num_samples`` held-out captions once each and compare with their real images.

    Returns {"metrics": {name: {"value", sample counts, …}}, "settings": {…}, "warnings": [...]}.
    ``sampling`` is how images are drawn (default the run's ``sampling:``); ``seed`` picks the held-out samples and
    each one's noise. Under torchrun every rank must call it with the same arguments; all get the same result.
    """
    started = time.monotonic()
    names = parse_metrics(list(metrics))
    sampling = sampling or pipeline.config.sampling
    heldout = heldout if heldout is not None else HeldOutSet.open(shards, num_samples, seed, caption_column)
    check_sample_count(names, len(heldout))
    if batch_size < 1:
        raise PrxError(f"--batch-size {batch_size} must be at least 1")
    size = int(resolution or pipeline.config.stages[-1].resolution)
    if size % pipeline.config.model.patch_size:
        raise PrxError(f"--resolution {size} is not a multiple of the model's patch size "
                       f"{pipeline.config.model.patch_size}")
    extractors = extractors if extractors is not None else build_extractors(
        names, inception_weights, clip_model, dino_model, pipeline.device)
    made = build_metrics(names, extractors, pipeline, seed)
    for metric in made.values():
        metric.to(pipeline.device)  # the states (NCCL reduces tensors on the GPU); extractors are not submodules
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    needs_samples = any(n in SAMPLING_METRICS for n in names)
    generate = (lambda captions, positions: _generate(pipeline, captions, positions, seed, size, sampling)
                ) if needs_samples else None
    batches = list(range(0, len(heldout), batch_size))[rank::world]
    kept, skipped = _accumulate(made, extractors, heldout, batches, batch_size, size, generate, progress)
    per_rank = [(kept, dict(skipped))]
    if dist.is_initialized():
        per_rank = [None] * world
        dist.all_gather_object(per_rank, (kept, dict(skipped)))
        skipped = sum((collections.Counter(bad) for _, bad in per_rank), collections.Counter())
    results = _computed(made, per_rank, len(heldout))
    if skipped:
        results["warnings"].append(f"{sum(skipped.values())} of {len(heldout)} samples skipped: {dict(skipped)}")
    results["settings"] = {
        "num_samples": len(heldout), "evaluated": sum(n for n, _ in per_rank), "skipped": dict(skipped),
        "seed": seed, "resolution": size, "batch_size": batch_size, "world_size": world,
        "samples_per_rank": [n for n, _ in per_rank],  # each generated (and compared) exactly once
        "data": [str(p) for p in heldout.paths], "caption_column": heldout.caption_columns[0],
        "real_images": f"resized (PIL bicubic) to cover {size}x{size}, centre-cropped; generated images alike",
        "sampling": {**{k: getattr(sampling, k) for k in ("steps", "guidance", "guidance_scale", "self_guidance_scale",
                                                          "sampler")},
                     "noise": "image p starts from the noise of seed + p"} if needs_samples else None,
        "extractors": {k: e.preprocessing for k, e in extractors.items()},
        "seconds": round(time.monotonic() - started, 1),
    }
    return results


def _accumulate(made: dict, extractors: dict, heldout: "HeldOutSet", batches: list[int], batch_size: int, size: int,
                generate, progress) -> tuple[int, collections.Counter]:
    """This rank's batches of held-out samples (and their generated images) into the metrics' states; returns the
    samples kept and the skipped ones by reason."""
    names = list(made)
    cache, skipped, kept = _GroupCache(), collections.Counter(), 0
    for done, start in enumerate(batches):
        rows = range(start, min(start + batch_size, len(heldout)))
        images, captions, positions, bad = heldout.load(rows, size, cache)
        skipped.update(bad)
        if not positions:
            continue
        kept += len(positions)
        real, index = _chw(images), torch.tensor(positions)
        fake = _chw([resize_center_crop(g, size) for g in generate(captions, positions)]) if generate else None
        features: dict[tuple[str, bool], torch.Tensor] = {}
        for kind, extractor in extractors.items():
            if any(EXTRACTOR_OF.get(n) == kind for n in names):
                features[kind, True] = extractor(real)
                features[kind, False] = extractor(fake)
        for name, metric in made.items():
            if name in ("fid", "fd_dinov2"):
                kind = EXTRACTOR_OF[name]
                metric.update(features[kind, True], real=True)
                metric.update(features[kind, False], real=False)
            elif name == "cmmd":
                metric.update(features["clip", True], real=True, index=index)
                metric.update(features["clip", False], real=False, index=index)
            elif name == "clip_score":
                text = extractors["clip"].encode_text(captions)
                metric.update(features["clip", False], text, real=False)
                metric.update(features["clip", True], text, real=True)
            elif name == "val_loss":
                metric.add_images(real, captions, positions)
        if progress is not None:
            progress(done + 1, len(batches))
    return kept, skipped


def _computed(made: dict, per_rank: list, total: int) -> dict:
    """Every metric's value (every rank computes: the states are reduced across ranks) and its warnings."""
    results: dict = {"metrics": {}, "warnings": []}
    for name, metric in made.items():
        try:
            value = _plain(metric.compute())
        except ValueError as e:  # e.g. fewer than 2 readable samples: the same on every rank
            raise PrxError(f"{name}: {e} ({sum(n for n, _ in per_rank)} of {total} samples were readable)") from None
        warning = metric.bias_warning(value["num_real"]) if hasattr(metric, "bias_warning") else None
        if warning:
            value["warning"] = warning
            results["warnings"].append(f"{name}: {warning}")
        if value.get("imaginary", 0) > 1e-3:
            results["warnings"].append(f"{name}: the matrix square root had an imaginary part of "
                                       f"{value['imaginary']:.1e} of its trace (ill-conditioned covariances)")
        results["metrics"][name] = value
    return results


def format_table(results: dict) -> str:
    header = f"{'metric':<28} {'value':>12} {'samples':>9}  note"
    lines = [header, "-" * len(header)]
    for name, r in results["metrics"].items():
        if name == "val_loss":
            for label, value, n in [("val_loss (all t)", r["value"], r["num_samples"])] + [
                    ("val_loss " + bin_name, b["value"], b["n"]) for bin_name, b in r["bins"].items()]:
                lines.append(f"{label:<28} {'—' if value is None else f'{value:.5f}':>12} {n:>9}")
            continue
        n = min(r.get("num_real", r.get("num_fake")), r.get("num_fake", r.get("num_real")))
        note = ""
        if name == "clip_score" and "real_images" in r:
            note = f"real images: {r['real_images']:.3f}"
        elif r.get("warning"):
            note = "biased: few samples"
        lines.append(f"{name:<28} {r['value']:>12.4f} {n:>9}  {note}".rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# `prx eval --data …`
# --------------------------------------------------------------------------------------------
