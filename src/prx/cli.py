"""The ``prx`` command line: train, sample, eval, export, bench, ablate, env and data (convert, split, embed, shapes,
inspect).

This module is the parser table and nothing heavy: each command's code is a module of :mod:`prx.commands`, loaded
only when it runs, so ``prx --help`` and a mistyped option answer at once. Errors a user can fix
(:class:`PrxError`) print as one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from prx.ablate.arms import DEFAULT_ARMS  # (names only: no torch)
from prx.errors import PrxError, os_errors_behind
from prx.files import refuse_inside_checkpoint
from prx.metrics.cli_options import add_real_eval_options

EXAMPLES_TRAIN = """examples:
  prx train                                   # the CPU demo on the shapes world (runs/demo)
  prx train configs/demo.yaml train.batch_size=32 --out runs/bs32
  prx train runs/demo/config.yaml --resume    # continue a run (the same command also resumes)
  prx train demo 'data.shards=[shards/train]' train.batch_size=4     # the demo on your shards
  prx train finetune model.init_from=export/photos 'data.shards=[shards/train]'   # fine-tune a diffusers pipeline
"""


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


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint directory, or a run directory (its checkpoints/latest is used)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="sampling steps (default: the run's "
                                                                        "sampling.steps)")
    p.add_argument("--guidance", choices=["cfg", "self", "both"], default=None,
                   help="cfg: classifier-free guidance (empty-caption negative); self: TREAD self-guidance "
                        "(routed vs dense pass, same prompt); both (default: the run's sampling.guidance)")
    p.add_argument("--guidance-scale", type=float, default=None, metavar="W",
                   help="classifier-free guidance scale, 1 = off (default: the run's sampling.guidance_scale)")
    p.add_argument("--self-guidance-scale", type=float, default=None, metavar="W",
                   help="self-guidance scale: routed + W·(dense − routed), 1 = off (default: the run's)")
    p.add_argument("--sampler", choices=["euler", "heun"], default=None, help="ODE sampler (default: the run's)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="image i starts from the noise of seed S+i "
                                                                    "(default 0)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA weights (default) or raw weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prx", description="Train pixel-space text-to-image diffusion transformers (the PRX speedrun recipe).")
    sub = parser.add_subparsers(dest="name", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (no CONFIG: the CPU demo on the shapes world)",
                       description="Train a model. With no CONFIG, trains the CPU demo on the built-in shapes world.",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a YAML config (path or built-in name: demo, ...) then dotted overrides like "
                        "train.batch_size=32")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<config name>); re-running resumes it")
    p.add_argument("--resume", action="store_true",
                   help="require resuming from DIR/checkpoints/latest (error if there is none)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved plan (stages, batches, losses, parameters per optimizer, FLOPs) and exit")
    p.set_defaults(command="prx.commands.train:run")

    p = sub.add_parser("plan", help="predict a config's peak GPU memory per rank and choose the settings that fit",
                       description="Plan a training step's peak memory per rank on the meta device (no GPU, no "
                                   "weights: a 7B model plans on a laptop): weights, gradients, optimizer states, "
                                   "activations with and without activation checkpointing, the EMA, the text "
                                   "encoder, the teachers, CUDA-graph pools. Chooses the micro-batch, activation "
                                   "checkpointing, text encoder on the GPU or precomputed embeddings, FSDP2 and CPU "
                                   "offload that fit, or says what cannot fit and the smallest change that would.",
                       epilog="examples:\n  prx plan finetune --model prxpixel-7b lora.enabled=true --gpu-memory 24GiB"
                              "\n  prx plan finetune model.init_from=DIR lora.enabled=true data.resolution=1024 "
                              "--gpu-memory 80GiB\n  prx plan speedrun --gpu-memory 141GiB --gpus 32",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a YAML config (path or built-in name) then dotted overrides (default: speedrun)")
    p.add_argument("--gpu-memory", required=True, metavar="SIZE",
                   help="memory of each GPU: 24GiB, 80GB, or a number of GiB")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs (ranks) the run trains on (default 1)")
    p.add_argument("--model", choices=["prxpixel-7b"], default=None,
                   help="plan the released PRXPixel's shape (7B, Qwen3-VL-2B text encoder) instead of the config's "
                        "model: nothing is downloaded")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(command="prx.commands.plan:run")

    p = sub.add_parser("sample", help="generate images from prompts with a checkpoint",
                       description="Generate one PNG per prompt: DIR/0000.png, DIR/0001.png, … in prompt order.")
    _sampling_options(p)
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    p.add_argument("--prompts", metavar="FILE", help="a text file with one prompt per line")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="images sampled together (default 32, fewer when they do not fit in memory)")
    p.add_argument("--width", type=int, default=None, metavar="W",
                   help="image width in pixels, a multiple of the patch size (with --height; default: the run's "
                        "last-stage resolution, square)")
    p.add_argument("--height", type=int, default=None, metavar="H", help="image height in pixels (with --width)")
    p.add_argument("--aspect-ratio", default=None, metavar="W:H",
                   help="e.g. 16:9 or 3:4: the nearest aspect-ratio bucket of the run's last-stage resolution "
                        "(the shapes it trained on)")
    p.set_defaults(command="prx.commands.sample:run")

    p = sub.add_parser("eval", help="judge prompt adherence on the shapes world, or FID/CMMD/… on real data",
                       description="Sample the shapes world's held-in, held-out and multi-object prompts and judge "
                                   "them from pixels: a table of per-attribute and all-correct accuracy, and JSON. "
                                   "With --data, compare generated and held-out real images instead (FID, "
                                   "FD-DINOv2, CMMD, CLIP score, validation loss by noise level).")
    _sampling_options(p)
    p.add_argument("--out", metavar="DIR", help="where results.json and sample grids go (default RUN/eval/step_N)")
    add_real_eval_options(p)
    p.set_defaults(command="prx.commands.eval:run")

    p = sub.add_parser("export",
                       help="write a checkpoint's EMA weights as one safetensors file or a diffusers pipeline",
                       description="--format prx (default): the EMA (or raw) weights of a checkpoint as one "
                                   "safetensors file with its config in the metadata (and beside it as YAML), for "
                                   "sampling anywhere: `prx sample --checkpoint FILE.safetensors`. --format diffusers: "
                                   "a directory that diffusers' PRXPixelPipeline.from_pretrained loads without prx "
                                   "(transformer, scheduler, text encoder, tokenizer, model card); a LoRA run's "
                                   "adapters are merged into its base, or written alone with --adapter-only. Works "
                                   "for checkpoints of any world size.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint or run directory")
    p.add_argument("--format", choices=["prx", "diffusers"], default="prx",
                   help="prx: one .safetensors file (default); diffusers: a PRXPixelPipeline directory")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="the .safetensors file (--format prx) or the new directory (--format diffusers; an existing "
                        "non-empty one is refused)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--adapter-only", action="store_true",
                   help="a LoRA run (lora.enabled): write its adapters alone in peft's format for diffusers "
                        "(adapter_model.safetensors + adapter_config.json, megabytes) instead of the merged pipeline")
    p.set_defaults(command="prx.commands.export:run")

    p = sub.add_parser("bench", help="throughput, step-time breakdown, peak memory and MFU of a config",
                       description="Run a few training steps of a config (the trainer's own step) and report "
                                   "images/s and tokens/s, the time of each phase (data, text encoder, denoiser "
                                   "forward, perceptual and REPA forwards, backward, optimizer, EMA), peak memory, "
                                   "and MFU from an explicit FLOP count that includes routing and every teacher. "
                                   "Under torchrun it measures the distributed step.",
                       epilog="examples:\n  prx bench demo\n  prx bench speedrun-tiny\n"
                              "  prx bench speedrun train.stages[0].batch_size=32 train.micro_batch_size=32  # GPU\n"
                              "  prx bench speedrun 'train.stages=[{resolution: 1024, steps: 100, batch_size: 64}]' "
                              "--largest-micro-batch 64,48,32,16",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                   help="a YAML config or built-in name (default demo)")
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
    p.set_defaults(command="prx.commands.bench:run")

    p = sub.add_parser("ablate", help="the recipe and its ablations at equal compute: one table and plots",
                       description="Train the config (arm 'full') and one arm per trick turned off, for each seed, as "
                                   "ordinary run directories OUT/arms/ARM-sS with the same data and noise per seed, at "
                                   "equal steps, FLOPs (prx's count: routing and teachers included) or minutes; "
                                   "measure each on held-out data (validation loss by noise level; on the shapes "
                                   "world the judge; FID, FD-DINOv2, CMMD, CLIP score where their weights are here); "
                                   "write OUT/results.md, .csv, .json and PNG plots. Re-running the command skips "
                                   "finished arms and resumes an interrupted one. See docs/ablations.md.",
                       epilog="examples:\n"
                              "  prx ablate speedrun-tiny --out runs/abl --budget-flops 2P\n"
                              "  prx ablate demo --out runs/abl-demo --arms full,no-ema,lr2x:optimizer.lr=2e-3 "
                              "--budget-minutes 10\n"
                              "  prx ablate tiny tread.route_ratio=0.5 --out runs/abl-tiny --arms full,no-tread,adamw "
                              "--budget-steps 6\n"
                              "  torchrun --nproc_per_node=8 -m prx.cli ablate speedrun --out runs/abl --budget-flops "
                              "5e18 --parallel-arms\n"
                              f"built-in arms: {', '.join(DEFAULT_ARMS)} (default: all)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="a YAML config or built-in name: the arm 'full'")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every arm, before the arm's own")
    p.add_argument("--out", required=True, metavar="DIR", help="the ablation's directory (arms/, heldout/, results.*)")
    p.add_argument("--arms", action="append", metavar="A,B,name:key=value,key=value",
                   help="arms to run, comma-separated, repeatable: built-in names, or your own as "
                        "name:key=value[,key=value] (default: every built-in arm; 'full' is always included)")
    p.add_argument("--seeds", default="0,1", metavar="S,S", help="seeds, comma-separated (default 0,1)")
    p.add_argument("--budget-steps", type=int, metavar="N", help="every arm trains N optimizer steps")
    p.add_argument("--budget-flops", metavar="F", help="every arm trains F FLOPs (e.g. 2.5e15, 2.5P, 300T): cheaper "
                                                      "steps buy more of them")
    p.add_argument("--budget-minutes", type=float, metavar="M",
                   help="every arm trains M minutes (single-stage configs)")
    p.add_argument("--points", type=int, default=10, help="evaluations (and checkpoints) per arm: the curves' points "
                                                          "(default 10)")
    p.add_argument("--eval-samples", type=int, default=1000, metavar="N",
                   help="held-out samples for the validation loss and the image metrics (default 1000)")
    p.add_argument("--judge-prompts", type=int, default=0, metavar="N",
                   help="shapes world: judge N prompts of each set (default 0: all 256 prompts)")
    p.add_argument("--no-image-metrics", action="store_true",
                   help="skip FID, FD-DINOv2, CMMD and CLIP score even where their weights are present")
    p.add_argument("--heldout", metavar="DIR", help="held-out prx shards (default: the config's eval.data; the shapes "
                                                    "world writes its own to OUT/heldout)")
    p.add_argument("--parallel-arms", action="store_true",
                   help="under torchrun: each rank trains its share of the arms alone, instead of all ranks each arm")
    p.add_argument("--dry-run", action="store_true",
                   help="print each arm's steps (per stage), FLOPs and overrides under the budget, and exit")
    p.add_argument("--report-only", action="store_true",
                   help="write the report of the arms finished so far and train nothing (also while the ablation "
                        "runs)")
    p.set_defaults(command="prx.commands.ablate:run")

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
    p.set_defaults(command="prx.commands.env:run")

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
                                   "  prx data convert --from webdataset tars/ --caption-columns "
                                   "prompt,enhanced_prompt --out shards/w\n  prx data convert --from parquet "
                                   "~/hf/flux_generated/data --preset flux-generated --out shards/fg",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--from", dest="kind", required=True, choices=["folder", "webdataset", "parquet"],
                   help="folder: images with .txt/.json captions beside them; webdataset: .tar files; parquet: "
                        "Hugging Face Parquet files (or directories of them)")
    q.add_argument("inputs", nargs="+", metavar="INPUT", help="a directory, or files / directories of tars or Parquet")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards")
    q.add_argument("--preset", help="column mapping of a known dataset: flux-generated, flux-reason-6m, "
                                    "midjourney-v6-llava")
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
    q.set_defaults(command="prx.commands.data:run_convert")

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
    q.set_defaults(command="prx.commands.data:run_embed")

    q = data_sub.add_parser("shapes", help="write the procedural shapes world as shards")
    q.add_argument("--out", required=True, metavar="DIR")
    q.add_argument("--count", type=int, default=10_000)
    q.add_argument("--resolution", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--per-shard", type=int, default=1000)
    q.set_defaults(command="prx.commands.data:run_shapes")

    q = data_sub.add_parser("split", help="hold out a stable fraction of shards for evaluation",
                            description="Copy shards into a training set and a held-out set. A sample is held out "
                                        "when a hash of its id (and --seed) is below --fraction, so it stays in the "
                                        "same split whatever the order or sharding of the inputs and whatever data "
                                        "is added later. Image bytes are copied, not re-encoded. Run `prx data "
                                        "embed` on the outputs afterwards.",
                            epilog="examples:\n"
                                   "  prx data split shards/all --fraction 0.05 --out-train shards/train "
                                   "--out-heldout shards/heldout\n"
                                   "  prx train demo 'data.shards=[shards/train]' train.batch_size=4\n"
                                   "  prx eval --checkpoint runs/demo --data shards/heldout --num-samples 500",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("shards", nargs="+", metavar="SHARDS", help="prx shard files, directories or globs")
    q.add_argument("--fraction", type=float, required=True, metavar="F",
                   help="the share of samples held out, between 0 and 1 (e.g. 0.05)")
    q.add_argument("--out-train", required=True, metavar="DIR", help="new directory for the training shards")
    q.add_argument("--out-heldout", required=True, metavar="DIR", help="new directory for the held-out shards")
    q.add_argument("--seed", type=int, default=0, help="another seed holds out another set (default 0)")
    q.set_defaults(command="prx.commands.data:run_split")

    q = data_sub.add_parser("inspect", help="counts, caption columns, buckets and embeddings of shards",
                            description="Summarise shards, or Parquet files as downloaded when a column mapping is "
                                        "given (which also reads and caches their image sizes, once, for training "
                                        "with data.dataset=parquet).",
                            epilog="examples:\n"
                                   "  prx data inspect shards/ --check 100\n"
                                   "  prx data inspect shards/train --config demo   # its buckets and batches\n"
                                   "  prx data inspect ~/hf/FLUX-Reason-6M --preset flux-reason-6m",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("shards", nargs="+", metavar="SHARDS", help="shard (or Parquet) files, directories or globs")
    q.add_argument("--preset", help="read downloaded Parquet files in place with a known column mapping: "
                                    "flux-generated, flux-reason-6m, midjourney-v6-llava")
    q.add_argument("--image-column", help="downloaded files: the image column")
    q.add_argument("--caption-columns", metavar="A[=B],...",
                   help="downloaded files: caption fields, optionally renamed")
    q.add_argument("--id-column", help="downloaded files: a stable id column")
    q.add_argument("--config", help="the training config (path or built-in name): its stages' resolutions, patch "
                                    "size, aspect range and batch sizes (can each batch be filled?), its embeddings")
    q.add_argument("--resolution", type=int, default=None,
                   help="stage resolution for the bucket table (default: the config's stages, else 512)")
    q.add_argument("--patch-size", type=int, default=None, help="default: the config's model.patch_size, else 32")
    q.add_argument("--check", type=_check_count, default=0, metavar="N|all",
                   help="also read and decode N random samples, or all of them (every row group and image)")
    q.set_defaults(command="prx.commands.data:run_inspect")
    data.set_defaults(command=None, help_of=data)
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
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]  # as typed, after the command's name (a report's)
    overrides = "items" if hasattr(args, "items") else "overrides" if hasattr(args, "overrides") else None
    if extra and overrides and all("=" in e and not e.startswith("-") for e in extra):
        getattr(args, overrides).extend(extra)  # key=value after the options: `prx train tiny --out X key=value`
    elif extra:
        parser.parse_args(argv)  # argparse's own error for what it does not know
    if getattr(args, "command", None) is None:
        (getattr(args, "help_of", None) or parser).print_help()
        return 0
    module, function = args.command.split(":")
    try:
        for option in ("out", "out_train", "out_heldout"):  # every command's outputs; only training writes a run
            if getattr(args, option, None):
                refuse_inside_checkpoint(getattr(args, option), "--" + option.replace("_", "-"))
        return getattr(importlib.import_module(module), function)(args)
    except PrxError as e:
        message = " ".join(str(e).split("\n"))
        if len(message) > 2000:  # a value quoted in full (a file's contents) would bury the line
            message = message[:1000] + " … " + message[-500:]
        sys.stderr.write(f"error: {message}\n")  # one write: under torchrun the ranks' lines do not interleave
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
