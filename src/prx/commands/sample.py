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

DEFAULT_BATCH = 32  # images sampled together when --batch-size is not given (fewer when they do not fit)


def run(args: argparse.Namespace) -> int:
    prompts, numbers = read_prompts(args)
    if args.aspect_ratio is not None and (args.width is not None or args.height is not None):
        raise PrxError("give either --aspect-ratio or --width/--height, not both")
    batch_size = args.batch_size if args.batch_size is not None else DEFAULT_BATCH
    # the values that do not need the model fail before it loads (the run's defaults are checked again when used)
    check_sampling_args(args, numbers[-1] + 1, batch_size)
    out = make_writable_dir(Path(args.out))
    # no caption cache: thousands of distinct prompts would keep thousands of encodings in memory
    pipe = Pipeline.from_checkpoint(args.checkpoint, weights=args.weights, device=args.device, text_cache_size=0)
    width, height = (pipe.size_for_aspect_ratio(args.aspect_ratio) if args.aspect_ratio is not None
                     else pipe.image_size(args.width, args.height))
    sampling = sampling_from_args(args, pipe.config.sampling)
    batch_size = min(batch_size, len(prompts))
    if args.batch_size is None and 0 < (fits := pipe.batch_that_fits(batch_size, width, height, sampling)) < batch_size:
        print(f"note: {batch_size} images of {width}×{height} do not fit in memory together: sampling {fits} at a time",
              file=sys.stderr)
        batch_size = fits
    pipe.check_fits(batch_size, width, height, sampling)  # one line, with what fits, before anything is allocated
    started = time.perf_counter()
    # a bar over every sampling step of every batch: long samplings (many steps, many prompts) show their progress
    rounds = -(-len(prompts) // batch_size)
    with tqdm(total=rounds * sampling.steps, desc="sample", unit="step", dynamic_ncols=True,
              disable=rounds == 1 and sampling.steps < 50,
              mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
        batches = pipe.generate_batches(prompts, sampling, batch_size=batch_size, width=width, height=height,
                                        numbers=numbers, progress=lambda: bar.update(1))
        # each batch is written as soon as it is sampled: memory stays one batch's, whatever the prompt count
        for start, images in batches:
            for i, image in enumerate(images.numpy()):
                save_png(image, out / f"{numbers[start + i]:04d}.png")
    seconds = time.perf_counter() - started
    last = f" … {out / f'{numbers[-1]:04d}.png'}" if len(prompts) > 1 else ""
    print(f"sampled {len(prompts)} image(s) of {width}×{height} in {seconds:.2f}s ({seconds / len(prompts):.3f}s "
          f"each): {out / f'{numbers[0]:04d}.png'}{last}")
    return 0
