"""Does a trained model see the brightness of a flat background? (The demo's collapsed background spread.)

1. One x0 prediction per noise level t from a shapes-world image rendered on a dark and a light grey,
   at fixed noise: the background grey the model predicts (a model that sees brightness follows the
   input, at least at low t, where x_t is nearly the image).
2. Why it may not: a flat patch of grey g is g times one fixed pixel vector, so without a bias the
   patch embedding gives a token proportional to g, and every LayerNorm after it sees the same
   normalised token whatever g. Prints the embedding's scaled and bias parts and the cosine of the
   normalised tokens of the two greys (1.0 = the blocks cannot tell them apart).
3. Where a sample's background is decided: 32 seeds of one prompt sampled with the run's settings
   (``--guidance-scale`` to change CFG); at each step the spread of the predicted background grey
   across seeds and its correlation with the global mean of x_t (which is all the starting noise
   can say about the background). The world's own spread is 6.1 grey levels.

    python benchmarks/brightness_probe.py runs/demo
"""

import argparse

import numpy as np
import torch

from prx.data.shapes import make_scene, render, single_specs, to_tensor
from prx.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run directory or checkpoint")
    parser.add_argument("--greys", type=int, nargs=2, default=[215, 245], help="two background greys (0..255)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale for part 3 (default: the run's)")
    args = parser.parse_args()
    pipe = Pipeline.from_checkpoint(args.checkpoint)
    model, resolution = pipe.model, pipe.config.stages[-1].resolution

    scene = make_scene(single_specs([("red", "circle", "top left")])[0], np.random.default_rng(0))
    text = pipe.text_encoder.encode([scene.caption])
    corner = slice(resolution * 5 // 8, resolution * 15 // 16)  # bottom right: background only
    print(f"predicted background grey (input greys {args.greys[0]} and {args.greys[1]}):")
    for t in (0.02, 0.05, 0.2, 0.5, 0.8):
        predicted = []
        for grey in args.greys:
            scene.background = grey
            x0 = to_tensor(render(scene, resolution))[None]
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                out = model((1 - t) * x0 + t * noise, torch.tensor([t]), text.embeds, text.mask).x0
            predicted.append(((out + 1) * 127.5)[0, :, corner, corner].mean().item())
        print(f"  t = {t:<4}  {predicted[0]:6.1f}  {predicted[1]:6.1f}")

    first, second = model.img_in
    pixels = torch.ones(3 * model.config.patch_size ** 2)
    tokens = []
    with torch.no_grad():
        for grey in args.greys:
            patch = (grey / 127.5 - 1) * pixels
            token = model.img_in(patch)
            scaled = second.weight @ (first.weight @ patch)
            print(f"flat patch of grey {grey}: token = scaled part (norm {scaled.norm():.2f}) + bias part "
                  f"(norm {(token - scaled).norm():.2f})")
            tokens.append(torch.nn.functional.layer_norm(token, token.shape))
    print(f"cosine of the two LayerNorm-ed tokens: {torch.nn.functional.cosine_similarity(*tokens, dim=0).item():.6f}")
    background_decision(pipe, scene.caption, corner, args.guidance_scale)


def background_decision(pipe: Pipeline, caption: str, corner: slice, guidance_scale: float | None, n: int = 32) -> None:
    from prx.sampling import guided_predictor, initial_noise, sample

    cfg, s = pipe.config, pipe.config.sampling
    resolution = cfg.stages[-1].resolution
    scale = s.guidance_scale if guidance_scale is None else guidance_scale
    predict = guided_predictor(pipe.model, pipe.text_encoder.encode([caption] * n), pipe.text_encoder.encode([""]),
                               "cfg", scale)
    grey = lambda images: (images[:, :, corner, corner].mean((1, 2, 3)) + 1) * 127.5  # noqa: E731
    rows = []

    def recording(x, t):  # the run's own sampler calls this once per step (twice with Heun)
        x0 = predict(x, t)
        corr = torch.corrcoef(torch.stack([grey(x0), x.mean((1, 2, 3))]))[0, 1].item()
        rows.append(f"  t = {float(t):.3f}  mean {grey(x0).mean():6.1f}  spread (std) {grey(x0).std():5.2f}  "
                    f"correlation with the mean of x_t {corr:5.2f}")
        return x0

    noise = initial_noise(n, resolution, resolution, 0, cfg.objective.noise_scale, cfg.objective.noise_offset)
    images = sample(recording, noise, s.steps, s.sampler, cfg.sampling_shift, cfg.objective.t_clamp, s.schedule)
    print(f"{n} seeds of '{caption}', CFG {scale:g}: the predicted background grey per sampling step")
    print("\n".join(row for i, row in enumerate(rows) if i % 3 == 0 or i == len(rows) - 1))
    print(f"final images: background spread {grey(images).std():.2f} grey levels (the world's: 6.1)")


if __name__ == "__main__":
    main()
