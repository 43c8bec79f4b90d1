"""``prx data convert | embed | shapes | inspect``: prepare prx shards (Parquet: image bytes, size, captions, optional
caption embeddings)."""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

from prx.config import load_config
from prx.data.buckets import bucket_indices, make_buckets
from prx.data.convert import convert, distributed_rank
from prx.data.embed import embed_shards
from prx.data.index import ShardIndex, check_samples
from prx.data.loader import ShardPlanner
from prx.data.mapping import mapping_from
from prx.data.shapes import write_shards
from prx.data.shards import encoder_tag, expand_shards, sidecar_path
from prx.data.split import split_shards
from prx.device import resolve_device
from prx.errors import PrxError
from prx.text import TextEncoder


def parse_size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.strip().lower().rstrip("b")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        raise PrxError(f"--shard-size '{text}' is not a size: write e.g. 256MB or 1GB") from None


def rank_of(args: argparse.Namespace) -> tuple[int, int]:
    env_rank, env_world = distributed_rank()
    rank = env_rank if args.rank is None else args.rank
    world = env_world if args.world_size is None else args.world_size
    if not 0 <= rank < world:
        raise PrxError(f"--rank {rank} is not in [0, --world-size {world})")
    return rank, world


def _mapping(args: argparse.Namespace):
    return mapping_from(args.preset or "", args.image_column or "", args.caption_columns or "", args.id_column or "")


def run_convert(args: argparse.Namespace) -> int:
    rank, world = rank_of(args)
    manifest = convert(args.kind, args.inputs, args.out, _mapping(args), workers=args.workers,
                       target_bytes=parse_size(args.shard_size), verify=not args.no_verify, rank=rank,
                       world_size=world)
    rejected = manifest["rejected"]
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards ({manifest['bytes'] / 2**20:.1f} MiB), "
          f"{rejected['count']} rejected {rejected['by_reason'] or ''}; tasks "
          f"{manifest['tasks_done']}/{manifest['tasks_total']}"
          f"{'' if manifest['complete'] else ' (incomplete: run again to finish)'}")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def run_embed(args: argparse.Namespace) -> int:
    config = load_config(args.config, []) if args.config else None
    name = args.encoder or (config.text.encoder if config else "minilm")
    length = args.max_length or (config.text.max_length if config else 64)
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    layers = config.text.num_layers if config and not args.encoder else None  # the config's encoder, as it trains
    encoder = TextEncoder(name, length, dtype, device, cache_size=0, num_layers=layers)
    rank, world = rank_of(args)
    stats = embed_shards(args.shards, encoder, args.columns.split(",") if args.columns else None, args.batch_size,
                         rank, world)
    print(f"embedded {stats['captions']} captions of {stats['shards'] - stats['skipped_existing']} shard(s) "
          f"({stats['skipped_existing']} already done) as '{stats['tag']}'")
    return 0


def run_shapes(args: argparse.Namespace) -> int:
    paths = write_shards(args.out, args.count, args.resolution, args.seed, per_shard=args.per_shard)
    print(f"{args.count} shapes-world samples at {args.resolution} px in {len(paths)} shard(s) under {args.out}")
    return 0


def run_split(args: argparse.Namespace) -> int:
    result = split_shards(args.shards, args.fraction, args.out_train, args.out_heldout, seed=args.seed)
    train, heldout = result["train"], result["heldout"]
    total = train["samples"] + heldout["samples"]
    done = " (already split: nothing to do)" if result["already_done"] else ""
    print(f"{total} samples: {train['samples']} for training in {args.out_train}, {heldout['samples']} held out "
          f"({heldout['samples'] / max(total, 1):.1%}) in {args.out_heldout}{done}")
    for line in result["damaged_row_groups"]:
        print(f"warning: skipped a damaged row group: {line}", file=sys.stderr)
    if not heldout["samples"] or not train["samples"]:
        print(f"warning: the {'held-out' if not heldout['samples'] else 'training'} split is empty: "
              f"{'raise' if not heldout['samples'] else 'lower'} --fraction (or add data)", file=sys.stderr)
    return 0


def print_config_fit(index: ShardIndex, config, name: str) -> None:
    """Whether each stage of ``config`` fills its batches from these samples (on one rank, as every world size does
    with data.sharding=rows), and whether the shards carry the embeddings of its text encoder."""
    for i, stage in enumerate(config.stages):
        key = f"train.stages[{i}].batch_size" if config.train.stages else "train.batch_size"
        planner = ShardPlanner(index, stage.resolution, config.model.patch_size, stage.batch_size, 0, 1,
                               config.train.seed, i, config.data.shuffle_window,
                               (config.data.min_aspect, config.data.max_aspect))
        batches = len(planner.plan(0))
        print(f"{name} stage {i + 1}: {batches} full batch{'es' * (batches != 1)} of {stage.batch_size} at "
              f"{stage.resolution} px an epoch ({batches * stage.batch_size} of {len(index)} samples)")
        try:
            planner.check(key)
        except PrxError as e:
            print(f"warning: {e}")
    t = config.text
    tag = encoder_tag(t.encoder, t.max_length, t.num_layers)
    done = sum(sidecar_path(p, tag).exists() for p in index.paths)
    print(f"embeddings of {name}'s text encoder ({tag}): {done}/{len(index.paths)} shards"
          + ("" if done == len(index.paths) else f" (`prx data embed SHARDS --config {name}` writes them)"))


def run_inspect(args: argparse.Namespace) -> int:
    shards = expand_shards(args.shards)
    in_place = args.preset or args.image_column or args.caption_columns or args.id_column  # downloaded files
    mapping = _mapping(args) if in_place else None
    index = ShardIndex(shards, mapping)
    kind = "shard(s)" if mapping is None else "Parquet file(s) read in place"
    print(f"{len(shards)} {kind}, {len(index)} samples, caption columns in every file: {index.caption_columns}")
    if index.unusable:
        print(f"{index.unusable} rows left out: their image header cannot be read")
    sidecars = collections.Counter(p.name.split(".emb-")[1][:-8] for s in shards
                                   for p in s.parent.glob(f"{s.stem}.emb-*.parquet"))
    if sidecars:
        print("precomputed embeddings: " + ", ".join(f"{tag} ({n}/{len(shards)} shards)"
                                                     for tag, n in sidecars.items()))
    config = load_config(args.config, []) if args.config else None
    patch = args.patch_size or (config.model.patch_size if config else 32)
    aspect = (config.data.min_aspect, config.data.max_aspect) if config else (0.5, 2.0)
    resolutions = [args.resolution] if args.resolution else sorted({s.resolution for s in config.stages}) if config \
        else [512]
    for resolution in resolutions:
        buckets = make_buckets(resolution, patch, *aspect)
        counts = np.bincount(bucket_indices(index.width, index.height, buckets), minlength=len(buckets))
        print(f"aspect-ratio buckets at {resolution} px, patch {patch} (width x height):")
        for b, n in zip(buckets, counts):
            print(f"  {b.width:>5}x{b.height:<5} {b.tokens(patch):>5} tokens  {n:>9} samples")
    if config is not None:
        print_config_fit(index, config, args.config)
    if args.check:
        picks = None if args.check == "all" else np.random.default_rng(0).choice(
            len(index), size=min(args.check, len(index)), replace=False)
        report = check_samples(index, picks)
        what = "every sample" if picks is None else f"{report['checked']} random samples"
        print(f"read and decoded {what} ({report['checked']}): {sum(report['failed'].values())} failed "
              f"{report['failed'] or ''}")
        for line in report["damaged"]:
            print(f"  damaged: {line}")
        for line in report["bad"]:
            print(f"  bad image: {line}")
    return 0
