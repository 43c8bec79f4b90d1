"""``prx export``: a checkpoint's weights as one safetensors file (``--format prx``) or a diffusers
``PRXPixelPipeline`` directory (``--format diffusers``)."""

from __future__ import annotations

import argparse

from prx.export import export_pipeline, export_safetensors, usage_snippet


def run(args: argparse.Namespace) -> int:
    if args.format == "diffusers":
        info = export_pipeline(args.checkpoint, args.out, args.weights)
        for note in info["notes"]:
            print(f"note: {note}")
        print(f"exported {args.weights} weights of step {info['step']} ({info['params'] / 1e6:.1f}M parameters) as a "
              f"diffusers PRXPixelPipeline: {info['out']} (model card: {info['out'] / 'README.md'}); generate with:")
        print("  " + usage_snippet(str(info["out"]), info["config"]).replace("\n", "\n  "))
        return 0
    info = export_safetensors(args.checkpoint, args.out, args.weights)
    out = info["out"]
    print(f"exported {args.weights} weights of step {info['step']} ({info['params'] / 1e6:.1f}M parameters): {out} "
          f"(+ {out.with_suffix('.yaml').name}); sample with: prx sample --checkpoint {out} --prompt ...")
    return 0
