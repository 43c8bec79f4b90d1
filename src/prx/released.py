"""The released PRXPixel's shapes (``Photoroom/prxpixel-t2i``: the transformer and its Qwen3-VL text backbone), for
plans, benchmarks and meta tensors: no download, no weights.

A released pipeline itself is read by ``model.init_from`` (:mod:`prx.config.pretrained`): its shape, its text encoder
and the way ``PRXPixelPipeline.encode_prompt`` uses it (cleaning, padding to ``prompt_max_tokens``), its noise scale,
resolution and shift.
"""

from __future__ import annotations

from prx.config.model import ModelConfig

# The released PRXPixel transformer's shape (Photoroom/prxpixel-t2i, revision bcd5e63): not read from its config.json
# here (no download) but from a public port that loads its 282 weights (maxdiffusion's PRXPixel parity tools):
# PRXTransformer2DModel(in_channels=3, patch_size=16, context_in_dim=2048, hidden_size=3584, mlp_ratio=3.5,
# num_heads=28, depth=24, axes_dim=[64, 64]) with a 768 → 768 → 3584 bottleneck img_in and resolution_embeds: 6.98B
# parameters. Its text encoder is the Qwen3-VL-2B text backbone (hidden 2048, 28 layers, 16 heads, 8 KV heads, head
# 128, MLP 6144, vocabulary 151936; about 1.7B parameters, 3.4 GB in bf16).
PRXPIXEL_7B = dict(patch_size=16, bottleneck_dim=768, hidden_dim=3584, num_layers=24, num_heads=28, mlp_ratio=3.5,
                   rope_theta=10000.0, text_dim=2048, resolution_embeds=True, norm_eps=1e-6)
QWEN3_VL_2B_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                         "mrope_interleaved": True})


def prxpixel_7b_model_config() -> ModelConfig:
    """prx's model config of the released 7B PRXPixel transformer (shape only: plans, benchmarks, meta tensors)."""
    return ModelConfig(**PRXPIXEL_7B)


def qwen3_vl_2b_text_config():
    """transformers' config of PRXPixel's text encoder (shape only)."""
    from transformers import Qwen3VLTextConfig

    return Qwen3VLTextConfig(**QWEN3_VL_2B_TEXT)
