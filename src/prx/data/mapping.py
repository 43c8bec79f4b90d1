"""Column mappings: which fields of a downloaded dataset become a shard's image, captions and id
(``prx data convert --preset/--image-column/--caption-columns``, ``data.dataset: parquet``). Plain data,
no heavy imports: the config's checks read the preset names."""

from __future__ import annotations

from dataclasses import dataclass, field

from prx.errors import PrxError

# Column mappings of the recipe's datasets as published on the Hugging Face hub (all Parquet with
# the image as a {bytes, path} struct): image column, {source caption column: shard column}, id
# column. Each maps its main caption to `caption`, so the three mix under one caption weighting.
PRESETS: dict[str, dict] = {
    # lehduong/flux_generated: data/train-*.parquet; image, width, height, caption_caption
    "flux-generated": {"image": "image", "captions": {"caption_caption": "caption"}, "id": None},
    # LucasFang/FLUX-Reason-6M: <Subset>/fluxdb-*.parquet; id, image, caption_detail (always set),
    # caption_original (the original prompt, often empty), other caption_* columns and scores
    "flux-reason-6m": {"image": "image", "captions": {"caption_detail": "caption", "caption_original": "original"},
                       "id": "id"},
    # brivangl/midjourney-v6-llava: data/train_*.parquet; id, image, prompt (Midjourney), llava (LLaVA caption)
    "midjourney-v6-llava": {"image": "image", "captions": {"llava": "caption", "prompt": "prompt"}, "id": "id"},
}


@dataclass
class Mapping:
    """Which input fields become the shard's image, captions and id."""

    image: str = "image"
    captions: dict[str, str] = field(default_factory=lambda: {"caption": "caption"})  # source → shard column
    id: str | None = None

    @property
    def caption_columns(self) -> list[str]:
        return list(dict.fromkeys(self.captions.values()))

    def sources_of(self, column: str) -> list[str]:
        """The input fields that feed a shard caption column, in mapping order."""
        return [src for src, dst in self.captions.items() if dst == column]


def mapping_from(preset: str = "", image: str = "", captions: str | list[str] = "", id: str = "") -> Mapping:
    """A mapping from a preset name, overridden field by field. ``captions``: ``"llava=caption,prompt"``
    or ``["llava=caption", "prompt"]`` (a field, optionally renamed)."""
    mapping = Mapping()
    if preset:
        if preset not in PRESETS:
            raise PrxError(f"unknown column-mapping preset '{preset}': one of {', '.join(PRESETS)}")
        known = PRESETS[preset]
        mapping = Mapping(known["image"], dict(known["captions"]), known["id"])
    if image:
        mapping.image = image
    items = captions.split(",") if isinstance(captions, str) else list(captions)
    items = [item.strip() for item in items if item.strip()]
    if items:
        mapping.captions = {}
        for item in items:
            src, _, dst = item.partition("=")
            mapping.captions[src.strip()] = (dst or src).strip()
    if id:
        mapping.id = id
    return mapping
