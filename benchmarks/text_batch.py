"""Host time to build a batch of cached caption encodings: padded on the host, a copy and a mask fill per
caption (as prx did until 2026-12-04), against ``prx.text.padded_batch`` (the real tokens and their rows; the
padding is made on the device the batch goes to). Side by side in one run, on this machine's CPU:

    python benchmarks/text_batch.py                       # the demo's batch: 64 captions, 24 tokens
    python benchmarks/text_batch.py --batch 32 --length 256   # the seed recipe's GPU batch
    python benchmarks/text_batch.py --batch 32 --length 256 --while-rendering   # the same while the shapes world
                                                              # renders the next 512 px batch in a thread, as in training

``--while-rendering`` measures the host's part of a GPU batch of cached captions (the rows of the real tokens and
the mask; the encodings are joined on the GPU), alone and while a thread renders: computed with torch's CPU ops
(as until 2026-12-04, with 1 torch thread and with torch's default) and with numpy (``prx.text.batch_layout``).
The host's own tensor work in a GPU step shares the cores with the data's render threads, and an OpenMP team
with one thread per core then waits for the thread that lost its core.
"""

import argparse
import time

import torch

from common import median_seconds
from prx.text import TextBatch, batch_layout, padded_batch


def padded_on_the_host(encodings: list[torch.Tensor], length: int) -> TextBatch:
    embeds = torch.zeros(len(encodings), length, encodings[0].shape[-1])
    mask = torch.zeros(len(encodings), length, dtype=torch.bool)
    for i, e in enumerate(encodings):
        embeds[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return TextBatch(embeds, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=24, help="the padded length")
    ap.add_argument("--width", type=int, default=384, help="the encoder's token width")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--while-rendering", action="store_true",
                    help="padded_batch alone and while the shapes world renders, with 1 and the default torch threads")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, min(20, args.length) + 1, (args.batch,), generator=gen)
    encodings = [torch.randn(int(n), args.width, generator=gen) for n in lengths]
    a, b = padded_on_the_host(encodings, args.length), padded_batch(encodings, args.length, "cpu")
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.mask, b.mask)
    if args.while_rendering:
        return while_rendering(encodings, args)
    runs = {name: [] for name in ("padded on the host, per caption", "padded_batch")}
    for _ in range(3):  # in turns, so both see the same machine
        runs["padded on the host, per caption"].append(
            median_seconds(lambda: padded_on_the_host(encodings, args.length), args.repeats))
        runs["padded_batch"].append(median_seconds(lambda: padded_batch(encodings, args.length, "cpu"), args.repeats))
    print(f"{args.batch} captions of {int(lengths.min())}-{int(lengths.max())} tokens, padded to {args.length}, "
          f"{args.width} wide; {torch.get_num_threads()} threads")
    for name, times in runs.items():
        print(f"  {name:<34} {min(times) * 1e3:7.3f} ms")


def layout_with_torch(lengths: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and mask of batch_layout, with torch's CPU ops (prx until 2026-12-04)."""
    lengths = torch.tensor(lengths)
    starts = torch.repeat_interleave(torch.arange(len(lengths)) * length - (lengths.cumsum(0) - lengths), lengths)
    return torch.arange(int(lengths.sum())) + starts, torch.arange(length) < lengths[:, None]


def while_rendering(encodings: list[torch.Tensor], args) -> None:
    import statistics

    from prx.config import load_config
    from prx.data.sources.shapes import Source

    lengths = [e.shape[0] for e in encodings]
    rows, mask = batch_layout(lengths, args.length)
    torch_rows, torch_mask = layout_with_torch(lengths, args.length)
    assert torch.equal(torch.from_numpy(rows), torch_rows) and torch.equal(torch.from_numpy(mask), torch_mask)
    cfg = load_config("speedrun", ["train.stages=[{resolution: 512, steps: 1000, batch_size: 32}]"])
    source, stage = Source(cfg), cfg.stages[0]
    default_threads = torch.get_num_threads()
    ways = [(f"torch, {threads} thread(s)", threads, layout_with_torch) for threads in dict.fromkeys((1, default_threads))]
    ways.append((f"numpy (batch_layout), {default_threads} torch thread(s)", default_threads, batch_layout))
    rows = {}
    for name, threads, layout in ways:
        torch.set_num_threads(threads)
        for rendering in (False, True, False, True):  # in turns, so both see the same machine
            step, times = 0, []
            while len(times) < args.repeats:
                if rendering and (source._next is None or source._next[1].done()):
                    source.batch(step, 0, stage)  # the next batch renders in a thread, as in training
                    step += 1
                start = time.perf_counter()
                layout(lengths, args.length)
                times.append(time.perf_counter() - start)
            source.finish_rendering()
            rows.setdefault((name, rendering), []).append(statistics.mean(times))
    torch.set_num_threads(default_threads)
    print(f"the rows and mask of {args.batch} captions padded to {args.length}: mean ms over {args.repeats} calls "
          f"(the better of 2 turns), {source.render_threads} render thread(s)")
    for (name, rendering), means in rows.items():
        print(f"  {name:<40} {'while a batch renders' if rendering else 'alone':<22} {min(means) * 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
