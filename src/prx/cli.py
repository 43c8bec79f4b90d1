"""The ``prx`` command: train, sample, eval."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from prx.errors import PrxError

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
    from prx.train import Trainer

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
    run_dir = Path(args.out) if args.out else Path("runs") / config.name
    trainer = Trainer(config, run_dir, resume=True if args.resume else None)
    trainer.run()
    return 130 if trainer.stop_reason == "interrupted" else 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        path = Path(args.prompts)
        if not path.exists() or path.is_dir():
            raise PrxError(f"prompts file '{path}' does not exist: give a text file with one prompt per line")
        prompts = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if not prompts:
            raise PrxError(f"prompts file '{path}' has no prompts: write one prompt per line")
        return prompts
    if not args.prompt:
        raise PrxError("no prompt given: use --prompt TEXT (repeatable) or --prompts FILE")
    return args.prompt


def _make_out_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PrxError(f"cannot write to output directory '{path}' ({e.strerror}): choose another with --out") from None
    return path


def cmd_sample(args: argparse.Namespace) -> int:
    from prx.images import save_png
    from prx.pipeline import Pipeline

    prompts = _read_prompts(args)
    out = _make_out_dir(Path(args.out))
    pipe = Pipeline.from_checkpoint(args.checkpoint, weights=args.weights, device=args.device)
    started = time.perf_counter()
    images = pipe.generate(prompts, steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
                           seed=args.seed, batch_size=args.batch_size, guidance=args.guidance,
                           self_guidance_scale=args.self_guidance_scale).numpy()
    seconds = time.perf_counter() - started
    for i, image in enumerate(images):
        save_png(image, out / f"{i:04d}.png")
    print(f"sampled {len(prompts)} image(s) in {seconds:.2f}s ({seconds / len(prompts):.3f}s each): "
          f"{out / '0000.png'}" + (f" … {out / f'{len(prompts) - 1:04d}.png'}" if len(prompts) > 1 else ""))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from prx.checkpoint import checkpoint_meta, find_checkpoint
    from prx.evaluate import evaluate, format_table, write_json
    from prx.pipeline import Pipeline

    ckpt = find_checkpoint(args.checkpoint)
    step = checkpoint_meta(ckpt)["step"]
    out = Path(args.out) if args.out else _run_dir_of(ckpt) / "eval" / f"step_{step:08d}"
    out = _make_out_dir(out)
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
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="judge prompt adherence on the shapes world",
                       description="Sample the shapes world's held-in, held-out and multi-object prompts and judge "
                                   "them from pixels: a table of per-attribute and all-correct accuracy, and JSON.")
    _sampling_options(p)
    p.add_argument("--out", metavar="DIR", help="where results.json and sample grids go (default RUN/eval/step_N)")
    p.set_defaults(func=cmd_eval)
    return parser


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
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
