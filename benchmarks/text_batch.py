"""Host time to build a batch of cached caption encodings: padded on the host, a copy and a mask fill per
caption (as prx did until 2026-12-04), against ``prx.text.padded_batch`` (the real tokens and their rows; the
padding is made on the device the batch goes to). Side by side in one run, on this machine's CPU:

    python benchmarks/text_batch.py                       # the demo's batch: 64 captions, 24 tokens
    python benchmarks/text_batch.py --batch 32 --length 256   # the seed recipe's GPU batch
"""

import argparse

import torch

from common import median_seconds
from prx.text import TextBatch, padded_batch


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
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, min(20, args.length) + 1, (args.batch,), generator=gen)
    encodings = [torch.randn(int(n), args.width, generator=gen) for n in lengths]
    a, b = padded_on_the_host(encodings, args.length), padded_batch(encodings, args.length, "cpu")
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.mask, b.mask)
    runs = {name: [] for name in ("padded on the host, per caption", "padded_batch")}
    for _ in range(3):  # in turns, so both see the same machine
        runs["padded on the host, per caption"].append(
            median_seconds(lambda: padded_on_the_host(encodings, args.length), args.repeats))
        runs["padded_batch"].append(median_seconds(lambda: padded_batch(encodings, args.length, "cpu"), args.repeats))
    print(f"{args.batch} captions of {int(lengths.min())}-{int(lengths.max())} tokens, padded to {args.length}, "
          f"{args.width} wide; {torch.get_num_threads()} threads")
    for name, times in runs.items():
        print(f"  {name:<34} {min(times) * 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
