"""``prx export``: a checkpoint's weights as one safetensors file (``--format prx``) or a diffusers
``PRXPixelPipeline`` directory (``--format diffusers``; a LoRA run's merged into its base), or a LoRA run's adapters
alone in peft's format (``--format diffusers --adapter-only``)."""

from __future__ import annotations

import argparse

from prx.errors import PrxError
from prx.export import adapter_snippet, export_adapter, export_pipeline, export_safetensors, usage_snippet


def run(args: argparse.Namespace) -> int:
    if args.adapter_only:
        if args.format != "diffusers":
            raise PrxError("--adapter-only writes peft's format for diffusers: add --format diffusers")
        info = export_adapter(args.checkpoint, args.out, args.weights)
        print(f"exported the {args.weights} LoRA adapters of step {info['step']} ({info['params'] / 1e6:.2f}M "
              f"parameters) in peft's format: {info['out']}; apply them to the base pipeline with:")
        print("  import torch; from diffusers import PRXPixelPipeline; from peft import PeftModel")
        print("  " + adapter_snippet(info["base"], str(info["out"])).replace("\n", "\n  "))
        return 0
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
