"""``data:`` what a run trains on (a source of :mod:`prx.data.sources` and its settings) and ``text:`` the
frozen text encoder that conditions it."""

from __future__ import annotations

import importlib.util
import pkgutil
from dataclasses import dataclass, field
from typing import ClassVar

from prx.config.rules import at_least, check, one_of, positive, within
from prx.data.mapping import PRESETS


def available_sources() -> list[str]:
    """The ``data.dataset`` names: one module of :mod:`prx.data.sources` each, found without importing them."""
    spec = importlib.util.find_spec("prx.data.sources")
    return sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations) if not m.name.startswith("_"))


@dataclass
class ShapesConfig:
    """The procedural shapes world (see prx.data.shapes)."""

    # relative frequency of scenes with 1, 2, 3 objects
    object_count_weights: list[float] = field(default_factory=lambda: [0.6, 0.3, 0.1])
    seed: int = 0


@dataclass
class CaptionWeight:
    column: str = "caption"
    weight: float = at_least(1.0, 0)


@dataclass
class DataConfig:
    """``data:`` what the run trains on: a source (a module of :mod:`prx.data.sources`) and its settings."""

    # shapes | shards | parquet (a module of prx.data.sources); auto: shards when data.shards is set, else shapes
    dataset: str = "auto"
    shards: list[str] = field(default_factory=list)  # directories, files or globs of shards (or of parquet files)
    # dataset=parquet: the column mapping, as `prx data convert --from parquet` takes it
    preset: str = ""  # flux-generated | flux-reason-6m | midjourney-v6-llava
    image_column: str = ""  # the image column (bytes or a {bytes, path} struct); default the preset's, else image
    # "field" or "field=name"; default the preset's, else caption
    caption_columns: list[str] = field(default_factory=list)
    id_column: str = ""  # a stable id column; default the preset's, else file name and row
    resolution: int = positive(512)
    caption_dropout: float = within(0.1, 0, 1, open_high=True)  # probability of the empty caption (enables CFG)
    # which caption column each sample uses, drawn by weight; empty = the shards' first column
    captions: list[CaptionWeight] = field(default_factory=list)
    embeddings: str = one_of("auto", "off")  # auto: precomputed embeddings of text.encoder when every shard has them
    num_workers: int = at_least(2, 0)  # DataLoader worker processes decoding images
    shuffle_window: int = at_least(16, 1)  # row groups whose samples are shuffled together
    # how ranks share the data: row_groups = each rank reads its own row groups (1/W of the bytes); rows = every rank
    # reads all of them and takes its rows of each global batch (the same batches for any world size, W times the
    # reads); auto = rows for data of at most shuffle_window row groups, else row_groups. A resumed run may change it
    # (as its world size): the position is kept, the batches from there on differ
    sharding: str = one_of("auto", "rows", "row_groups")
    min_aspect: float = within(0.5, 0, 1, open_low=True)  # aspect-ratio buckets (width / height) span
    max_aspect: float = at_least(2.0, 1)  # [min_aspect, max_aspect]
    shapes: ShapesConfig = field(default_factory=ShapesConfig)

    # a resumed run keeps these: its saved data position counts batches of this exact plan
    # (caption weights, dropout, workers and embeddings may change)
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("dataset", "shards", "preset", "image_column", "caption_columns",
                                                   "id_column", "shuffle_window", "min_aspect", "max_aspect", "shapes")

    def __post_init__(self) -> None:
        if self.dataset == "auto":
            self.dataset = "shards" if self.shards else "shapes"

    def check(self, run) -> None:
        sources = available_sources()
        check(not (self.dataset == "shapes" and self.shards), "data.shards is set but data.dataset=shapes: drop "
              "data.dataset (or set shards, or parquet for downloaded files) to train on them, or drop data.shards")
        check(self.dataset in sources, f"data.dataset='{self.dataset}' is unknown: use {', '.join(sources)}")
        check(self.dataset == "shapes" or bool(self.shards),
              f"data.dataset={self.dataset} needs data.shards: a list of directories, files or globs"
              + (" (see `prx data convert`)" if self.dataset == "shards" else " of the downloaded .parquet files"))
        if self.preset:
            check(self.preset in PRESETS, f"data.preset='{self.preset}' is unknown: use one of {', '.join(PRESETS)}")
        mapped = self.preset or self.image_column or self.caption_columns or self.id_column
        check(self.dataset == "parquet" or not mapped,
              "data.preset / image_column / caption_columns / id_column map downloaded files: set data.dataset=parquet "
              "(prx shards need no mapping)")
        check(not self.captions or sum(c.weight for c in self.captions) > 0,
              "data.captions weights must be ≥ 0 with a positive sum")
        w = self.shapes.object_count_weights
        check(1 <= len(w) <= 3 and all(x >= 0 for x in w) and sum(w) > 0, "data.shapes.object_count_weights must "
              "be 1 to 3 non-negative weights (for 1, 2, 3 objects) with a positive sum")


@dataclass
class TextConfig:
    """``text:`` the frozen text encoder."""

    # "minilm" (bundled, offline), a Hugging Face hub id, a local directory, or a diffusers pipeline directory (its
    # text_encoder/ and tokenizer/)
    encoder: str = "minilm"
    # keep only the encoder's first N layers (None: all). The rest are never run (saved with the export as
    # an N-layer encoder): cheaper encoding, and a middle layer's tokens can be the better condition
    num_layers: int | None = positive(None)
    max_length: int = positive(64)
    dtype: str = one_of("float32", "bfloat16", "float16")
    cache_size: int = at_least(100_000, 0)  # encodings of repeated captions are reused
    # ... and take at most this much memory (least recently used first out), where cache_device says: auto = where
    # the encoder runs (on a GPU a batch of cached captions is then built there, with no host work), or cpu
    cache_gib: float = at_least(2.0, 0)
    cache_device: str = one_of("auto", "cpu")
    # a batch's caption tokens are padded to at least this many (masked, so the result is the same): a compiled
    # model then sees one text length instead of recompiling for a batch of shorter captions
    min_length: int = at_least(0, 0)

    # where the tokenizer is when it is neither beside the encoder nor a pipeline's tokenizer/ (None: found there)
    tokenizer: str | None = None
    # prompt cleaning before tokenising: none, or prx_pixel (diffusers' PRXPixelPipeline: ftfy.fix_text, HTML
    # unescaped twice, surrounding spaces stripped), so a fine-tune of a released model reads what it will be prompted
    clean: str = one_of("none", "prx_pixel")
    # run the encoder on every caption padded to max_length, as PRXPixelPipeline does (padding="max_length"): the
    # real tokens' embeddings are then computed at inference's shapes; the padding is still dropped (masked)
    pad_to_max_length: bool = False

    # a resumed run keeps these: the model's text projection learned this encoder's tokens
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("encoder", "max_length", "num_layers", "tokenizer", "clean",
                                                  "pad_to_max_length")

    def check(self, run) -> None:
        check(self.min_length <= self.max_length, f"text.min_length ({self.min_length}) pads caption tokens up to "
              f"at most text.max_length ({self.max_length}): lower it or raise text.max_length")
