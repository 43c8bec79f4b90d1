"""``prx sample``: one PNG per prompt, DIR/0000.png, DIR/0001.png, … in prompt order."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from prx.commands.common import check_sampling_args, read_prompts, sampling_from_args
from prx.errors import PrxError
from prx.files import make_writable_dir
from prx.images import save_png
from prx.pipeline import Pipeline


def run(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    if args.aspect_ratio is not None and (args.width is not None or args.height is not None):
        raise PrxError("give either --aspect-ratio or --width/--height, not both")
    # the values that do not need the model fail before it loads (the run's defaults are checked again when used)
    check_sampling_args(args, len(prompts), args.batch_size)
    out = make_writable_dir(Path(args.out))
    # no caption cache: thousands of distinct prompts would keep thousands of encodings in memory
    pipe = Pipeline.from_checkpoint(args.checkpoint, weights=args.weights, device=args.device, text_cache_size=0)
    width, height = (pipe.size_for_aspect_ratio(args.aspect_ratio) if args.aspect_ratio is not None
                     else pipe.image_size(args.width, args.height))
    started = time.perf_counter()
    batches = pipe.generate_batches(prompts, sampling_from_args(args, pipe.config.sampling),
                                    batch_size=args.batch_size, width=width, height=height)
    # each batch is written as soon as it is sampled: memory stays one batch's, whatever the prompt count
    with tqdm(total=len(prompts), desc="sample", unit="img", dynamic_ncols=True,
              disable=len(prompts) <= args.batch_size, mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
        for start, images in batches:
            for i, image in enumerate(images.numpy()):
                save_png(image, out / f"{start + i:04d}.png")
            bar.update(len(images))
    seconds = time.perf_counter() - started
    last = f" … {out / f'{len(prompts) - 1:04d}.png'}" if len(prompts) > 1 else ""
    print(f"sampled {len(prompts)} image(s) of {width}×{height} in {seconds:.2f}s ({seconds / len(prompts):.3f}s "
          f"each): {out / '0000.png'}{last}")
    return 0
