"""The PRX transformer in pixel space.

Image patches go through a linear bottleneck (3·p² → bottleneck → hidden). Text tokens are
projected once and never updated; every block projects them to its own keys/values. Image
tokens are the only queries, attending over [text; image] keys with the text padding mask.
2D axial RoPE on image q/k, QK RMSNorm, GeGLU MLP, adaLN-zero from the timestep, and a
zero-initialised final layer, so a fresh model predicts x0 = 0 exactly.

The forward pass takes the token routing as an argument (TREAD: a subset of image tokens
skips blocks ``start..end`` and re-enters unchanged) and can return the hidden state after a
given block (REPA), so the recipe's tricks need no hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from prx.config import build_section
from prx.config.model import ModelConfig
from prx.config.rules import block_index, check_fields
from prx.tread import Route


@dataclass
class PRXOutput:
    x0: Tensor  # predicted clean image, (B, 3, H, W)
    hidden: Tensor | None = None  # (B, N or K, hidden) after block `capture_block`
    hidden_index: Tensor | None = None  # (B, K) image tokens in `hidden` when that block was routed; None = all N


# --------------------------------------------------------------------------------------------
# Patches and positions
# --------------------------------------------------------------------------------------------


def token_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """(rows, columns) of the image tokens of a ``height`` × ``width`` image: the one place it is computed."""
    return height // patch, width // patch


def token_count(height: int, width: int, patch: int) -> int:
    rows, columns = token_grid(height, width, patch)
    return rows * columns


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) → (B, H/p·W/p, C·p·p), channel-major per patch (like F.unfold)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, p: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`patchify` for an image of h×w pixels."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, -1, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, -1, h, w)


def rope_2d(grid_h: int, grid_w: int, head_dim: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """Axial 2D RoPE tables (cos, sin), each (N, head_dim/2), for integer row/column positions.

    Half of the rotation pairs turn with the row index, half with the column index.
    """
    axis_dim = head_dim // 2
    freqs = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
    rows = torch.arange(grid_h, dtype=torch.float64, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64, device=device).repeat(grid_h)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of x (B, heads, N, D) by angles with cos/sin of shape (B|1, 1, N, D/2)."""
    x_pairs = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x_pairs[..., 0], x_pairs[..., 1]
    out = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [cos, sin] of scale·t (t in [0, 1]), in diffusers' order of operations."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * (t.float()[:, None] * freqs[None])
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def resolution_embedding(height: int, width: int, batch: int, device=None) -> Tensor:
    """(B, 256): 128-wide sinusoids of the image height and width in pixels, as diffusers' PRXResolutionEmbedder."""
    size = torch.tensor([float(height), float(width)], device=device)
    h, w = timestep_embedding(size, 128, scale=1.0).expand(batch, -1, -1).unbind(1)
    return torch.cat([h, w], dim=-1)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, ...) at per-sample indices idx (B, K) → (B, K, ...)."""
    index = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


def scatter_tokens(full: Tensor, idx: Tensor, part: Tensor) -> Tensor:
    """A copy of ``full`` with rows ``idx`` (B, K) replaced by ``part`` (B, K, ...)."""
    index = idx.reshape(*idx.shape, *([1] * (full.dim() - 2))).expand(-1, -1, *full.shape[2:])
    return full.scatter(1, index, part)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def rms_norm(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """``norm(x)`` with the weight in x's dtype: under bf16 autocast nn.RMSNorm would get a bf16 input and an
    fp32 weight, warn ("Mismatch dtype between input and weight") and skip its fused kernel. Same values."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation (PRX's MLP). Compiled, it is written as x·σ(2z), z = √(2/π)(x + 0.044715x³):
    the same function (½(1 + tanh z) = σ(2z), fp32 rounding apart), and the exp in σ costs inductor's CPU code
    half what tanh does (the demo's MLP activation, forward + backward: 2.2 → 1.4 ms on AVX2, 1.6 → 0.9 ms on
    AVX-512). Eager, torch's one fused kernel is the faster of the two."""
    if not torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    x32 = x.float()
    z = math.sqrt(2 / math.pi) * (x32 + 0.044715 * x32 * x32 * x32)
    return (x32 * torch.sigmoid(2 * z)).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, kernel: str = "sdpa") -> Tensor:
    """softmax(q·kᵀ/√d, keys masked)·v for q (B, H, N, d), k and v (B, H, L, d), key_mask (B, 1, 1, L).

    sdpa: torch's fused kernel (flash attention on GPUs and CPUs). math: the same function written out,
    which inductor fuses; on a CPU its forward and backward are 2-3× faster than the fused kernel's at a
    few dozen tokens (``train.attention``). Both need at least one unmasked key per row (image keys always are).
    """
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    if kernel != "math":
        raise ValueError(f"unknown attention kernel '{kernel}': use 'sdpa' or 'math'")
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~key_mask, float("-inf")).softmax(dim=-1).to(v.dtype) @ v


PACKED_ROWS_MULTIPLE = 64


def packed_text_rows(real: int, total: int) -> int:
    """How many rows of a batch's text are projected when packed: its ``real`` tokens, then padding rows up to
    a multiple of 64 (of ``total``): oneDNN builds a bf16 matmul kernel per shape, so the count must not change
    every step."""
    return min(total, -(-real // PACKED_ROWS_MULTIPLE) * PACKED_ROWS_MULTIPLE)


def packs_text(device: torch.device) -> bool:
    """Whether the forward projects only the real text tokens, not the padding (same values): on a CPU, where short
    captions padded to a batch's length make the text projections a large part of a small model's step. A GPU keeps
    the padded layout: counting the real tokens would make the host wait for the device."""
    return device.type == "cpu"


def projected_text_rows(text_mask: Tensor) -> int:
    """The text rows a forward projects for this (B, L) mask: the packed count on a CPU, all of them elsewhere (FLOP
    accounting, ``prx bench``)."""
    if packs_text(text_mask.device):
        return packed_text_rows(int(text_mask.sum()), text_mask.numel())
    return text_mask.numel()


class PRXBlock(nn.Module):
    """Image tokens attend to [text; image]; text tokens are read, never written.

    ``txt`` is the projected text, (B, L, dim), or with ``text_rows`` only its real tokens, (N, dim), rows
    ``text_rows`` of the (B·L) grid (:func:`packs_text`).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.norm_eps = norm_eps
        self.head_dim = dim // num_heads
        mlp_dim = int(round(dim * mlp_ratio))
        self.modulation = nn.Linear(dim, 6 * dim)  # adaLN-zero: shift/scale/gate for attention and MLP
        self.img_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.txt_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.txt_k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.mlp_in = nn.Linear(dim, 2 * mlp_dim, bias=False)  # GeGLU gate and up, fused
        self.mlp_out = nn.Linear(mlp_dim, dim, bias=False)
        self.attention = "sdpa"  # the attention kernel, "sdpa" or "math" (set by the trainer: train.attention)
        self.compiled_compute = None  # :meth:`compute` compiled (:meth:`compile_compute`, train.compile)
        # compiled for static image shapes (train.compile_shapes): the sizes that follow the caption length are
        # then marked dynamic, so a batch of longer captions reuses the graph
        self.dynamic_text_length = False

    def compile_compute(self, **options) -> None:
        """``torch.compile`` the block's computation (``options`` are torch.compile's). What compiles is
        :meth:`compute`, not the module's call: FSDP2's pre-forward hook hands the block new tensors of its inputs
        (its post-backward hook's outputs), so sizes marked dynamic on the originals would not reach a compiled
        call; :meth:`forward` marks them on the tensors it is given, outside the compiled code."""
        self.compiled_compute = torch.compile(self.compute, **options)

    def forward(self, x: Tensor, vec: Tensor, txt: Tensor, key_mask: Tensor, cos: Tensor, sin: Tensor,
                text_rows: Tensor | None = None) -> Tensor:
        if self.compiled_compute is None:
            return self.compute(x, vec, txt, key_mask, cos, sin, text_rows)
        if text_rows is not None or self.dynamic_text_length:  # packed text: one graph for any number of real tokens
            torch._dynamo.maybe_mark_dynamic(txt, 0 if text_rows is not None else 1)
        if self.dynamic_text_length:
            if text_rows is not None:
                torch._dynamo.maybe_mark_dynamic(text_rows, 0)
            torch._dynamo.maybe_mark_dynamic(key_mask, 3)
        return self.compiled_compute(x, vec, txt, key_mask, cos, sin, text_rows)

    def compute(self, x: Tensor, vec: Tensor, txt: Tensor, key_mask: Tensor, cos: Tensor, sin: Tensor,
                text_rows: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        heads, hd = self.num_heads, self.head_dim
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(vec)[:, None].chunk(6, dim=-1)

        h = modulate(F.layer_norm(x, (d,), eps=self.norm_eps), shift1, scale1)
        q, k, v = self.img_qkv(h).view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q = apply_rope(rms_norm(self.q_norm, q), cos, sin)
        k = apply_rope(rms_norm(self.k_norm, k), cos, sin)
        txt_kv = self.txt_kv(txt)
        if text_rows is not None:  # txt is rows text_rows of (B·L), the real tokens: the other keys are masked, left 0
            txt_kv = txt_kv.new_zeros(b * (key_mask.shape[-1] - n), 2 * d).index_copy(0, text_rows, txt_kv)
        txt_k, txt_v = txt_kv.view(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
        k = torch.cat([rms_norm(self.txt_k_norm, txt_k), k], dim=2)
        v = torch.cat([txt_v, v], dim=2)
        attn = attention(q, k, v, key_mask, self.attention)
        x = x + gate1 * self.attn_out(attn.transpose(1, 2).reshape(b, n, d))

        h = modulate(F.layer_norm(x, (d,), eps=self.norm_eps), shift2, scale2)
        gate, up = self.mlp_in(h).chunk(2, dim=-1)
        return x + gate2 * self.mlp_out(gelu_tanh(gate) * up)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_eps = norm_eps
        self.modulation = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.modulation(vec)[:, None].chunk(2, dim=-1)
        return self.proj(modulate(F.layer_norm(x, (x.shape[-1],), eps=self.norm_eps), shift, scale))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class PRX(nn.Module):
    def __init__(self, config: ModelConfig | dict):
        super().__init__()
        if isinstance(config, dict):  # e.g. {"patch_size": 32, "num_layers": 24, "hidden_dim": 1024}
            config = model_config_from_dict(config)
        if config.text_dim is None:
            raise ValueError("ModelConfig.text_dim must be set (the text encoder's hidden size)")
        self.config = config
        dim, p = config.hidden_dim, config.patch_size
        patch_dim = 3 * p * p
        # Linear bottleneck, no activation between: a low-rank factorised patch projection.
        self.img_in = nn.Sequential(nn.Linear(patch_dim, config.bottleneck_dim), nn.Linear(config.bottleneck_dim, dim))
        self.txt_in = nn.Linear(config.text_dim, dim)
        self.time_in = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        # optional: the image's (height, width) embedded and added to the timestep vector
        self.resolution_in = (nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
                              if config.resolution_embeds else None)
        eps = config.norm_eps
        self.blocks = nn.ModuleList(PRXBlock(dim, config.num_heads, config.mlp_ratio, eps)
                                    for _ in range(config.num_layers))
        self.final_layer = FinalLayer(dim, patch_dim, eps)
        self.activation_checkpointing = False  # recompute block activations in backward (set by the trainer)
        self.pack_text: bool | None = None  # None: where packs_text (a CPU); the memory planner traces a GPU's False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.config.patch_bias_std:  # flat patches of different greys then embed to different directions
            nn.init.normal_(self.img_in[1].bias, std=self.config.patch_bias_std)
        for lin in [*self.time_in, *(self.resolution_in or [])]:
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=0.02)
        # adaLN-zero: every block starts as the identity, the output starts at exactly 0.
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        for lin in (self.final_layer.modulation, self.final_layer.proj):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # The recipe's optimizer split: Muon for 2D matrices inside the blocks, Adam for the rest.
    @property
    def muon_params(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters()
                if p.requires_grad and p.ndim == 2 and name.startswith("blocks.")]

    @property
    def adam_params(self) -> list[nn.Parameter]:
        muon = {id(p) for p in self.muon_params}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in muon]

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        text_embeds: Tensor,
        text_mask: Tensor,
        route: Route | None = None,
        capture_block: int | None = None,
    ) -> PRXOutput:
        """Predict x0 from the noisy image x_t (B, 3, H, W) at times t (B,).

        text_embeds (B, L, text_dim) and text_mask (B, L) (True = real token) condition it.
        ``route`` sends only ``route.keep`` image tokens through blocks start..end;
        ``capture_block`` returns the hidden state after that block (negative counts from the end).
        """
        _, _, height, width = x_t.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
        num_layers = len(self.blocks)
        if capture_block is not None:
            capture_block = block_index(capture_block, num_layers)
        x, vec, txt, text_rows, cos, sin, text_keys, key_mask = self.block_inputs(x_t, t, text_embeds, text_mask)

        hidden = hidden_index = None
        full_x = full_cos = full_sin = full_mask = None
        for i, block in enumerate(self.blocks):
            if route is not None and i == route.start % num_layers:
                full_x, full_cos, full_sin, full_mask = x, cos, sin, key_mask
                x, cos, sin, key_mask = self.routed_inputs(x, cos, sin, text_keys, route.keep)
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, vec, txt, key_mask, cos, sin, text_rows,
                                                      use_reentrant=False)
            else:
                x = block(x, vec, txt, key_mask, cos, sin, text_rows)
            if i == capture_block:
                hidden = x
                hidden_index = route.keep if full_x is not None else None
            if route is not None and i == route.end % num_layers:
                # Routed tokens re-enter exactly as they left.
                x = scatter_tokens(full_x, route.keep, x)
                cos, sin, key_mask = full_cos, full_sin, full_mask
                full_x = None

        out = self.final_layer(x, vec)
        return PRXOutput(x0=unpatchify(out, p, height, width).float(), hidden=hidden, hidden_index=hidden_index)

    def block_inputs(self, x_t: Tensor, t: Tensor, text_embeds: Tensor, text_mask: Tensor) -> tuple:
        """What every block reads: the image tokens, the conditioning vector, the projected text (and its rows, where
        :func:`packs_text`), the RoPE tables, the text keys' mask and the [text; image] key mask."""
        b, _, height, width = x_t.shape
        p = self.config.patch_size
        x = self.img_in(patchify(x_t, p))
        vec = self.time_in(timestep_embedding(t).to(x.dtype))
        if self.resolution_in is not None:
            vec = vec + self.resolution_in(resolution_embedding(height, width, b, x.device).to(x.dtype))
        vec = F.silu(vec)
        # The text is read by every block, never written. Where packs_text, only its real tokens are projected
        # (here and by each block's K/V), and each block puts its K/V back in the padded layout.
        if packs_text(x.device) if self.pack_text is None else self.pack_text:
            real = text_mask.bool().flatten()
            kept = packed_text_rows(int(real.sum()), real.numel())
            text_rows = torch.argsort(~real, stable=True)[:kept]  # the real tokens first
            txt = self.txt_in(text_embeds.flatten(0, 1).index_select(0, text_rows).to(x.dtype))
        else:
            text_rows, txt = None, self.txt_in(text_embeds.to(x.dtype))
        cos, sin = rope_2d(height // p, width // p, self.config.hidden_dim // self.config.num_heads,
                           self.config.rope_theta, device=x.device)
        cos, sin = cos[None, None], sin[None, None]  # (1, 1, N, hd/2)
        # Keys are [text; image]: mask out text padding, always attend to every image token.
        text_keys = text_mask.bool()[:, None, None, :]
        key_mask = torch.cat([text_keys, text_keys.new_ones(b, 1, 1, x.shape[1])], dim=-1)
        return x, vec, txt, text_rows, cos, sin, text_keys, key_mask

    @staticmethod
    def routed_inputs(x: Tensor, cos: Tensor, sin: Tensor, text_keys: Tensor, keep: Tensor) -> tuple:
        """TREAD: the routed blocks' inputs, each sample's kept tokens ``keep`` (B, K) with their RoPE tables, and
        the shorter key mask."""
        b = x.shape[0]
        x = gather_tokens(x, keep)
        cos = gather_tokens(cos.expand(b, 1, -1, -1).transpose(1, 2), keep).transpose(1, 2)
        sin = gather_tokens(sin.expand(b, 1, -1, -1).transpose(1, 2), keep).transpose(1, 2)
        key_mask = torch.cat([text_keys, text_keys.new_ones(b, 1, 1, x.shape[1])], dim=-1)
        return x, cos, sin, key_mask


def model_config_from_dict(data: dict) -> ModelConfig:
    """A model config from a plain dict (the seed's ``{"patch_size": 32, ...}``), presets and checks included.

    Without ``num_heads`` the heads are 64 wide; without ``text_dim`` the model takes the bundled
    MiniLM encoder's 384-wide tokens (set it for another encoder).
    """
    data = dict(data)
    if "num_heads" not in data and "hidden_dim" in data and data.get("preset") is None:
        data["num_heads"] = max(1, int(data["hidden_dim"]) // 64)
    cfg = build_section(ModelConfig, data, "model.")
    if cfg.text_dim is None:
        cfg.text_dim = 384
    check_fields(cfg, "model")
    cfg.check()
    return cfg


def build_model(config: ModelConfig) -> PRX:
    return PRX(config)


def param_count(config: ModelConfig) -> int:
    """The number of parameters a config builds, counted on the meta device (nothing is allocated)."""
    if config.text_dim is None:
        config = replace(config, text_dim=384)
    with torch.device("meta"):
        return sum(p.numel() for p in PRX(config).parameters())
