"""The ``prx`` command: train, sample, eval, export, bench and data (convert, embed, shapes, inspect).

Every command imports what it needs when it runs, so ``prx --help`` and config errors answer at
once; errors a user can fix (:class:`PrxError`) print as one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path

from prx.errors import PrxError, os_errors_behind

EXAMPLES_TRAIN = """examples:
  prx train                                   # the CPU demo on the shapes world (runs/demo)
  prx train configs/demo.yaml train.batch_size=32 --out runs/bs32
  prx train runs/demo/config.yaml --resume    # continue a run (the same command also resumes)
"""


def _run_dir_of(checkpoint: Path) -> Path:
    """RUN/checkpoints/step_X → RUN."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def cmd_train(args: argparse.Namespace) -> int:
    from prx.config import load_config

    config_arg, overrides = None, []
    for item in args.items:
        if "=" in item:
            overrides.append(item)
        elif config_arg is None and not overrides:
            config_arg = item
        else:
            raise PrxError(f"unexpected argument '{item}': give one CONFIG, then key=value overrides")
    config = load_config(config_arg, overrides)
    if args.dry_run:
        from prx.plan import describe_plan

        print(describe_plan(config))
        return 0
    from prx.train import Trainer  # torch loads here, after the config is known to be good

    run_dir = Path(args.out) if args.out else Path("runs") / config.name
    trainer = Trainer(config, run_dir, resume=True if args.resume else None)
    trainer.run()
    return trainer.exit_code  # 0, or 128 + the signal that stopped the run (130 Ctrl-C, 143 SIGTERM)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        path = Path(args.prompts)
        if not path.exists() or path.is_dir():
            raise PrxError(f"prompts file '{path}' does not exist: give a text file with one prompt per line")
        data = path.read_bytes()
        try:
            if b"\x00" in data:
                raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise PrxError(f"prompts file '{path}' is not UTF-8 text (byte {e.start}: {e.reason}): give a text file "
                           f"with one prompt per line") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise PrxError(f"prompts file '{path}' has no prompts: write one prompt per line")
        return prompts
    if not args.prompt:
        raise PrxError("no prompt given: use --prompt TEXT (repeatable) or --prompts FILE")
    return args.prompt


def _check_sampling_args(args: argparse.Namespace, count: int, batch_size: int = 1) -> None:
    """The sampling options given on the command line, checked before the model loads (the run's own
    defaults are checked when they are used)."""
    from prx.sampling import check_request

    def given(value, default):
        return default if value is None else value

    check_request(count, given(args.steps, 1), given(args.guidance_scale, 1.0), given(args.self_guidance_scale, 1.0),
                  batch_size, args.seed)


def cmd_sample(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from prx.images import save_png
    from prx.pipeline import Pipeline
    from prx.runtime import make_writable_dir
    prompts = _read_prompts(args)
    if args.aspect_ratio is not None and (args.width is not None or args.height is not None):
        raise PrxError("give either --aspect-ratio or --width/--height, not both")
    # the values that do not need the model fail before it loads (the run's defaults are checked again when used)
    _check_sampling_args(args, len(prompts), args.batch_size)
    out = make_writable_dir(Path(args.out))
    # no caption cache: thousands of distinct prompts would keep thousands of encodings in memory
    pipe = Pipeline.from_checkpoint(args.checkpoint, weights=args.weights, device=args.device, text_cache_size=0)
    width, height = (pipe.size_for_aspect_ratio(args.aspect_ratio) if args.aspect_ratio is not None
                     else pipe.image_size(args.width, args.height))
    started = time.perf_counter()
    batches = pipe.generate_batches(prompts, steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
                                    seed=args.seed, batch_size=args.batch_size, guidance=args.guidance,
                                    self_guidance_scale=args.self_guidance_scale, width=width, height=height)
    # each batch is written as soon as it is sampled: memory stays one batch's, whatever the prompt count
    with tqdm(total=len(prompts), desc="sample", unit="img", dynamic_ncols=True, disable=len(prompts) <= args.batch_size,
              mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
        for start, images in batches:
            for i, image in enumerate(images.numpy()):
                save_png(image, out / f"{start + i:04d}.png")
            bar.update(len(images))
    seconds = time.perf_counter() - started
    print(f"sampled {len(prompts)} image(s) of {width}×{height} in {seconds:.2f}s ({seconds / len(prompts):.3f}s each): "
          f"{out / '0000.png'}" + (f" … {out / f'{len(prompts) - 1:04d}.png'}" if len(prompts) > 1 else ""))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from prx.checkpoint import checkpoint_meta, find_checkpoint
    from prx.evaluate import evaluate, format_table, write_json
    from prx.pipeline import Pipeline
    from prx.runtime import make_writable_dir

    if args.data:  # real data: FID, FD-DINOv2, CMMD, CLIP score, validation loss
        from prx.metrics.evaluate_real import run_cli

        return run_cli(args)
    if args.metrics:
        raise PrxError("--metrics needs --data (held-out shards); without --data, prx eval judges the shapes world")
    _check_sampling_args(args, 400_000)  # four prompt sets, seeds seed + 100000·k + i
    ckpt = find_checkpoint(args.checkpoint)
    step = checkpoint_meta(ckpt)["step"]
    out = Path(args.out) if args.out else _run_dir_of(ckpt) / "eval" / f"step_{step:08d}"
    out = make_writable_dir(out)
    pipe = Pipeline.from_checkpoint(ckpt, weights=args.weights, device=args.device)
    print(f"evaluating {ckpt} (step {step}, {args.weights} weights) …", flush=True)
    results = evaluate(pipe, out, steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
                       seed=args.seed, guidance=args.guidance, self_guidance_scale=args.self_guidance_scale)
    results["checkpoint"] = str(ckpt)
    results["step"] = step
    results["weights"] = args.weights
    print(format_table(results))
    write_json(results, out / "results.json")
    print(f"results: {out / 'results.json'} (sample grids beside it, took {results['settings']['seconds']}s)")
    return 0


def _parse_size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.strip().lower().rstrip("b")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        raise PrxError(f"--shard-size '{text}' is not a size: write e.g. 256MB or 1GB") from None


def _check_count(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of samples ≥ 0 or 'all'")
    return value


def _rank(args: argparse.Namespace) -> tuple[int, int]:
    from prx.data.convert import distributed_rank

    env_rank, env_world = distributed_rank()
    rank = env_rank if args.rank is None else args.rank
    world = env_world if args.world_size is None else args.world_size
    if not 0 <= rank < world:
        raise PrxError(f"--rank {rank} is not in [0, --world-size {world})")
    return rank, world


def cmd_data_convert(args: argparse.Namespace) -> int:
    from prx.data.convert import convert, mapping_from

    mapping = mapping_from(args.preset or "", args.image_column or "", args.caption_columns or "", args.id_column or "")
    rank, world = _rank(args)
    manifest = convert(args.kind, args.inputs, args.out, mapping, workers=args.workers,
                       target_bytes=_parse_size(args.shard_size), verify=not args.no_verify, rank=rank, world_size=world)
    rejected = manifest["rejected"]
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards ({manifest['bytes'] / 2**20:.1f} MiB), "
          f"{rejected['count']} rejected {rejected['by_reason'] or ''}; tasks {manifest['tasks_done']}/{manifest['tasks_total']}"
          f"{'' if manifest['complete'] else ' (incomplete: run again to finish)'}")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def cmd_data_embed(args: argparse.Namespace) -> int:
    from prx.config import load_config
    from prx.data.embed import embed_shards
    from prx.runtime import resolve_device
    from prx.text import TextEncoder

    config = load_config(args.config, []) if args.config else None
    name = args.encoder or (config.text.encoder if config else "minilm")
    length = args.max_length or (config.text.max_length if config else 64)
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    layers = config.text.num_layers if config and not args.encoder else None  # the config's encoder, as it trains
    encoder = TextEncoder(name, length, dtype, device, cache_size=0, num_layers=layers)
    rank, world = _rank(args)
    stats = embed_shards(args.shards, encoder, args.columns.split(",") if args.columns else None, args.batch_size,
                         rank, world)
    print(f"embedded {stats['captions']} captions of {stats['shards'] - stats['skipped_existing']} shard(s) "
          f"({stats['skipped_existing']} already done) as '{stats['tag']}'")
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from prx.data.shapes import write_shards

    paths = write_shards(args.out, args.count, args.resolution, args.seed, per_shard=args.per_shard)
    print(f"{args.count} shapes-world samples at {args.resolution} px in {len(paths)} shard(s) under {args.out}")
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from prx.data.split import split_shards

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


def cmd_data_inspect(args: argparse.Namespace) -> int:
    import collections

    import numpy as np

    from prx.data.buckets import bucket_indices, make_buckets
    from prx.data.loader import ShardIndex
    from prx.data.shards import expand_shards

    shards = expand_shards(args.shards)
    mapping = None
    if args.preset or args.image_column or args.caption_columns or args.id_column:  # downloaded files, read in place
        from prx.data.convert import mapping_from

        mapping = mapping_from(args.preset or "", args.image_column or "", args.caption_columns or "", args.id_column or "")
    index = ShardIndex(shards, mapping)
    kind = "shard(s)" if mapping is None else "Parquet file(s) read in place"
    print(f"{len(shards)} {kind}, {len(index)} samples, caption columns in every file: {index.caption_columns}")
    if index.unusable:
        print(f"{index.unusable} rows left out: their image header cannot be read")
    sidecars = collections.Counter(p.name.split(".emb-")[1][:-8] for s in shards for p in s.parent.glob(f"{s.stem}.emb-*.parquet"))
    if sidecars:
        print("precomputed embeddings: " + ", ".join(f"{tag} ({n}/{len(shards)} shards)" for tag, n in sidecars.items()))
    buckets = make_buckets(args.resolution, args.patch_size)
    counts = np.bincount(bucket_indices(index.width, index.height, buckets), minlength=len(buckets))
    print(f"aspect-ratio buckets at {args.resolution} px, patch {args.patch_size}:")
    for b, n in zip(buckets, counts):
        print(f"  {b.width:>5}x{b.height:<5} {b.tokens(args.patch_size):>5} tokens  {n:>9} samples")
    if args.check:
        from prx.data.loader import check_samples

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


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "diffusers":
        from prx.diffusers_io import export_pipeline, usage_snippet

        info = export_pipeline(args.checkpoint, args.out, args.weights)
        for note in info["notes"]:
            print(f"note: {note}")
        print(f"exported {args.weights} weights of step {info['step']} ({info['params'] / 1e6:.1f}M parameters) as a "
              f"diffusers PRXPixelPipeline: {info['out']} (model card: {info['out'] / 'README.md'}); generate with:")
        print("  " + usage_snippet(str(info["out"]), info["config"]).replace("\n", "\n  "))
        return 0
    from safetensors.torch import save_file

    from prx.checkpoint import checkpoint_config, checkpoint_meta, find_checkpoint, load_weights
    from prx.model import build_model
    from prx.runtime import make_writable_dir

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise PrxError(f"--out {out} should end in .safetensors (or use --format diffusers to write a pipeline directory)")
    if out.is_dir() or out.with_suffix(".yaml").is_dir():
        raise PrxError(f"--out {out} is a directory: give the path of a new .safetensors file")
    ckpt = find_checkpoint(args.checkpoint)
    step = checkpoint_meta(ckpt)["step"]  # a damaged checkpoint stops here, naming the file
    config = checkpoint_config(ckpt)
    from prx.model import param_count
    from prx.runtime import check_memory, resolve_device

    check_memory(param_count(config.model), resolve_device("cpu"), "inference", f"the model of checkpoint '{ckpt}'")
    model = build_model(config.model)
    load_weights(ckpt, model, args.weights)  # full tensors, whatever world size wrote the checkpoint
    make_writable_dir(out.parent if str(out.parent) else Path("."))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"prx_config": config.to_yaml(), "step": str(step), "weights": args.weights})
        tmp.replace(out)
    except OSError as e:
        raise PrxError(f"cannot write --out {out} ({e.strerror or e}): choose another path") from None
    finally:
        tmp.unlink(missing_ok=True)
    config.save(out.with_suffix(".yaml"))
    n = sum(v.numel() for v in model.state_dict().values())
    print(f"exported {args.weights} weights of step {step} ({n / 1e6:.1f}M parameters): {out} (+ {out.with_suffix('.yaml').name}); "
          f"sample with: prx sample --checkpoint {out} --prompt ...")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from prx.config import load_config

    config = load_config(args.config, args.overrides)
    from prx.bench import format_bench, largest_micro_batch, run_bench  # torch loads here, after the config is good

    if args.largest_micro_batch:
        result = largest_micro_batch(config, args.largest_micro_batch)
        best = result["largest_micro_batch"]
        print(f"{config.name} at {result['resolution']} px: " + (f"the largest micro-batch that fits is {best} of "
              f"{', '.join(str(c) for c in sorted(args.largest_micro_batch, reverse=True))}" if best else
              "none of the micro-batches tried fits: try smaller ones or train.activation_checkpointing=true"))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    result = run_bench(config, steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops,
                       warm_text=not args.encode_text, profile=args.profile)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(format_bench(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    import json

    from prx.envinfo import collect, format_report

    info = collect(args.config)
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint directory, or a run directory (its checkpoints/latest is used)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="sampling steps (default: the run's sampling.steps)")
    p.add_argument("--guidance", choices=["cfg", "self", "both"], default=None,
                   help="cfg: classifier-free guidance (empty-caption negative); self: TREAD self-guidance "
                        "(routed vs dense pass, same prompt); both (default: the run's sampling.guidance)")
    p.add_argument("--guidance-scale", type=float, default=None, metavar="W",
                   help="classifier-free guidance scale, 1 = off (default: the run's sampling.guidance_scale)")
    p.add_argument("--self-guidance-scale", type=float, default=None, metavar="W",
                   help="self-guidance scale: routed + W·(dense − routed), 1 = off (default: the run's)")
    p.add_argument("--sampler", choices=["euler", "heun"], default=None, help="ODE sampler (default: the run's)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="image i starts from the noise of seed S+i (default 0)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA weights (default) or raw weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prx", description="Train pixel-space text-to-image diffusion transformers (the PRX speedrun recipe).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (no CONFIG: the CPU demo on the shapes world)",
                       description="Train a model. With no CONFIG, trains the CPU demo on the built-in shapes world.",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a YAML config (path or built-in name: demo, ...) then dotted overrides like train.batch_size=32")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<config name>); re-running resumes it")
    p.add_argument("--resume", action="store_true",
                   help="require resuming from DIR/checkpoints/latest (error if there is none)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved plan (stages, batches, losses, parameters per optimizer, FLOPs) and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate images from prompts with a checkpoint",
                       description="Generate one PNG per prompt: DIR/0000.png, DIR/0001.png, … in prompt order.")
    _sampling_options(p)
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    p.add_argument("--prompts", metavar="FILE", help="a text file with one prompt per line")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="images sampled together (default 32)")
    p.add_argument("--width", type=int, default=None, metavar="W",
                   help="image width in pixels, a multiple of the patch size (with --height; default: the run's "
                        "last-stage resolution, square)")
    p.add_argument("--height", type=int, default=None, metavar="H", help="image height in pixels (with --width)")
    p.add_argument("--aspect-ratio", default=None, metavar="W:H",
                   help="e.g. 16:9 or 3:4: the nearest aspect-ratio bucket of the run's last-stage resolution "
                        "(the shapes it trained on)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="judge prompt adherence on the shapes world, or FID/CMMD/… on real data",
                       description="Sample the shapes world's held-in, held-out and multi-object prompts and judge "
                                   "them from pixels: a table of per-attribute and all-correct accuracy, and JSON. "
                                   "With --data, compare generated and held-out real images instead (FID, "
                                   "FD-DINOv2, CMMD, CLIP score, validation loss by noise level).")
    _sampling_options(p)
    p.add_argument("--out", metavar="DIR", help="where results.json and sample grids go (default RUN/eval/step_N)")
    from prx.metrics.cli_options import add_real_eval_options

    add_real_eval_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a checkpoint's EMA weights as one safetensors file or a diffusers pipeline",
                       description="--format prx (default): the EMA (or raw) weights of a checkpoint as one safetensors "
                                   "file with its config in the metadata (and beside it as YAML), for sampling anywhere: "
                                   "`prx sample --checkpoint FILE.safetensors`. --format diffusers: a directory that "
                                   "diffusers' PRXPixelPipeline.from_pretrained loads without prx (transformer, "
                                   "scheduler, text encoder, tokenizer, model card). Works for checkpoints of any world size.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint or run directory")
    p.add_argument("--format", choices=["prx", "diffusers"], default="prx",
                   help="prx: one .safetensors file (default); diffusers: a PRXPixelPipeline directory")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="the .safetensors file (--format prx) or the new directory (--format diffusers; an existing "
                        "non-empty one is refused)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="throughput, step-time breakdown, peak memory and MFU of a config",
                       description="Run a few training steps of a config (the trainer's own step) and report "
                                   "images/s and tokens/s, the time of each phase (data, text encoder, denoiser "
                                   "forward, perceptual and REPA forwards, backward, optimizer, EMA), peak memory, "
                                   "and MFU from an explicit FLOP count that includes routing and every teacher. "
                                   "Under torchrun it measures the distributed step.",
                       epilog="examples:\n  prx bench demo\n  prx bench speedrun-tiny\n"
                              "  prx bench speedrun train.stages[0].batch_size=32 train.micro_batch_size=32   # on a GPU\n"
                              "  prx bench speedrun 'train.stages=[{resolution: 1024, steps: 100, batch_size: 64}]' "
                              "--largest-micro-batch 64,48,32,16",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG", help="a YAML config or built-in name (default demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, caches; default 2)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU (default: known GPUs, "
                                                                    "or a measured matmul on CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--encode-text", action="store_true",
                   help="time the text encoder on the timed steps' captions too (default on the shapes world: they "
                        "are encoded before timing, as a long run's caption cache serves them)")
    p.add_argument("--profile", metavar="FILE", help="then profile a few more steps (torch.profiler, at most 5) and "
                                                     "write the ops by device and by host time to FILE, with how busy "
                                                     "the device was and the kernel launches per step")
    p.add_argument("--largest-micro-batch", type=lambda s: [int(x) for x in s.split(",")], metavar="N,N,...",
                   help="instead: find the largest of these micro-batch sizes whose step fits in device memory "
                        "(one process, largest first, the first stage's resolution), e.g. 64,48,32,24,16")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("env", help="what this machine gives prx: torch, CUDA, GPUs, compiler, cached weights",
                       description="Print torch and CUDA versions, each GPU with its memory and bf16 support, the "
                                   "CPU's vector ISA and whether its bf16 matmuls beat fp32, the C++ compiler "
                                   "torch.compile would use and whether it builds, the Hugging Face cache and which "
                                   "of the recipe's weights are in it (looked up on disk, never on the network), "
                                   "and what `prx train CONFIG` would use here.",
                       epilog="examples:\n  prx env\n  prx env --config demo\n  prx env --json > env.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="speedrun", help="the config whose plan is shown (default speedrun)")
    p.add_argument("--json", action="store_true", help="print JSON instead")
    p.set_defaults(func=cmd_env)

    data = sub.add_parser("data", help="prepare datasets: convert, split, embed, shapes, inspect",
                          description="Prepare prx shards (Parquet: image bytes, size, captions, optional embeddings).")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND")

    def rank_options(q):
        q.add_argument("--rank", type=int, default=None, help="this process's rank (default: torchrun's RANK, else 0)")
        q.add_argument("--world-size", type=int, default=None,
                       help="number of processes sharing the work (default: torchrun's WORLD_SIZE, else 1)")

    q = data_sub.add_parser("convert", help="image folders, webdataset tars or Hugging Face Parquet → shards",
                            description="Convert a dataset to prx shards, in parallel and resumably (re-run the "
                                        "same command after an interruption). Writes OUT/manifest.json with counts, "
                                        "bytes, an aspect-ratio histogram and the rejected files with reasons.",
                            epilog="examples:\n"
                                   "  prx data convert --from folder photos/ --out shards/photos\n"
                                   "  prx data convert --from webdataset tars/ --caption-columns prompt,enhanced_prompt --out shards/w\n"
                                   "  prx data convert --from parquet ~/hf/flux_generated/data --preset flux-generated --out shards/fg",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--from", dest="kind", required=True, choices=["folder", "webdataset", "parquet"],
                   help="folder: images with .txt/.json captions beside them; webdataset: .tar files; parquet: "
                        "Hugging Face Parquet files (or directories of them)")
    q.add_argument("inputs", nargs="+", metavar="INPUT", help="a directory, or files / directories of tars or Parquet")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards")
    q.add_argument("--preset", help="column mapping of a known dataset: flux-generated, flux-reason-6m, midjourney-v6-llava")
    q.add_argument("--image-column", help="input column (Parquet) holding the image (default image)")
    q.add_argument("--caption-columns", metavar="A[=B],...",
                   help="input caption fields, optionally renamed in the shards: e.g. llava=caption,prompt "
                        "(default caption; for folders and tars, a .txt file or JSON fields)")
    q.add_argument("--id-column", help="input column with a stable sample id (default: file and row)")
    q.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="parallel processes")
    q.add_argument("--shard-size", default="256MB", help="target size of a shard (default 256MB)")
    q.add_argument("--no-verify", action="store_true", help="read only image headers (faster; corrupt pixel data "
                                                           "is then caught, and skipped, when training)")
    rank_options(q)
    q.set_defaults(func=cmd_data_convert)

    q = data_sub.add_parser("embed", help="precompute caption embeddings beside the shards",
                            description="Run the text encoder once over the shards' captions and store the token "
                                        "embeddings in sidecar files; training then skips the encoder for them. "
                                        "Resumable; shards split across ranks under torchrun.")
    q.add_argument("shards", nargs="+", metavar="SHARDS", help="shard files, directories or globs")
    q.add_argument("--config", help="take text.encoder and text.max_length from this config (path or built-in name)")
    q.add_argument("--encoder", help="text encoder: minilm, a hub id or a local directory")
    q.add_argument("--max-length", type=int, help="token length (must match the training config's text.max_length)")
    q.add_argument("--columns", help="caption columns to embed (default: all)")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--device", default="auto")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="encoder dtype (default bf16 on GPU)")
    rank_options(q)
    q.set_defaults(func=cmd_data_embed)

    q = data_sub.add_parser("shapes", help="write the procedural shapes world as shards")
    q.add_argument("--out", required=True, metavar="DIR")
    q.add_argument("--count", type=int, default=10_000)
    q.add_argument("--resolution", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--per-shard", type=int, default=1000)
    q.set_defaults(func=cmd_data_shapes)

    q = data_sub.add_parser("split", help="hold out a stable fraction of shards for evaluation",
                            description="Copy shards into a training set and a held-out set. A sample is held out "
                                        "when a hash of its id (and --seed) is below --fraction, so it stays in the "
                                        "same split whatever the order or sharding of the inputs and whatever data "
                                        "is added later. Image bytes are copied, not re-encoded. Run `prx data "
                                        "embed` on the outputs afterwards.",
                            epilog="examples:\n"
                                   "  prx data split shards/all --fraction 0.05 --out-train shards/train --out-heldout shards/heldout\n"
                                   "  prx train demo data.dataset=shards 'data.shards=[shards/train]'\n"
                                   "  prx eval --checkpoint runs/demo --data shards/heldout --num-samples 500",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("shards", nargs="+", metavar="SHARDS", help="prx shard files, directories or globs")
    q.add_argument("--fraction", type=float, required=True, metavar="F",
                   help="the share of samples held out, between 0 and 1 (e.g. 0.05)")
    q.add_argument("--out-train", required=True, metavar="DIR", help="new directory for the training shards")
    q.add_argument("--out-heldout", required=True, metavar="DIR", help="new directory for the held-out shards")
    q.add_argument("--seed", type=int, default=0, help="another seed holds out another set (default 0)")
    q.set_defaults(func=cmd_data_split)

    q = data_sub.add_parser("inspect", help="counts, caption columns, buckets and embeddings of shards",
                            description="Summarise shards, or Parquet files as downloaded when a column mapping is "
                                        "given (which also reads and caches their image sizes, once, for training "
                                        "with data.dataset=parquet).",
                            epilog="examples:\n"
                                   "  prx data inspect shards/ --check 100\n"
                                   "  prx data inspect ~/hf/FLUX-Reason-6M --preset flux-reason-6m",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("shards", nargs="+", metavar="SHARDS", help="shard (or Parquet) files, directories or globs")
    q.add_argument("--preset", help="read downloaded Parquet files in place with a known column mapping: "
                                    "flux-generated, flux-reason-6m, midjourney-v6-llava")
    q.add_argument("--image-column", help="downloaded files: the image column")
    q.add_argument("--caption-columns", metavar="A[=B],...", help="downloaded files: caption fields, optionally renamed")
    q.add_argument("--id-column", help="downloaded files: a stable id column")
    q.add_argument("--resolution", type=int, default=512, help="stage resolution for the bucket table")
    q.add_argument("--patch-size", type=int, default=32)
    q.add_argument("--check", type=_check_count, default=0, metavar="N|all",
                   help="also read and decode N random samples, or all of them (every row group and image)")
    q.set_defaults(func=cmd_data_inspect)
    data.set_defaults(func=lambda a: data.print_help() or 0)
    return parser


# a write the disk refused: no space, a quota, a file-size limit, a read-only file system
OUT_OF_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def out_of_room(error: OSError, out: str | None = None) -> str:
    """One line for a write the disk refused, from whichever command (a checkpoint has its own, which names the
    intact one): why, where (the error's file, else the command's ``--out``), and that the same command picks up
    where it stopped."""
    where = error.filename or out
    return (f"a write{f' to {where}' if where else ''} failed: {os.strerror(error.errno)}. Make room (or write "
            f"elsewhere) and run the same command again: prx train resumes from its last checkpoint and prx data "
            f"convert / embed skip the work they finished")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except PrxError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: under torchrun the ranks' lines do not interleave
        return 2
    except Exception as e:  # a write the disk refused, as an OSError or in a library's own error type
        refused = next((o for o in os_errors_behind(e) if o.errno in OUT_OF_ROOM), None)
        if refused is None:
            raise
        sys.stderr.write(f"error: {out_of_room(refused, getattr(args, 'out', None))}\n")
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
