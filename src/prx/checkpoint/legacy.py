"""Checkpoints of prx before format 2: DCP's default layout, a pickled ``.metadata`` and ``.distcp`` files holding
pickled Python values. Read without running anything from them: an allow-list unpickler builds only DCP's own
metadata classes, and values load with ``torch.load(weights_only=True)``; anything else is refused as tampered."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from prx.errors import CheckpointDamaged

# Checkpoints of prx before format 2: DCP's default layout. Its .metadata is a pickle; read it with
# an unpickler that builds nothing but the classes DCP writes there.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {(_DCP_METADATA, name) for name in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath")}


class _MetadataUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD can be restricted too
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which DCP never writes there")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference, which DCP never writes there")

    def _load_build(self):
        if isinstance(self.stack[-2], type):  # BUILD on a class would set attributes of the class itself
            raise pickle.UnpicklingError("it modifies a class")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


def read_legacy_metadata(path: Path):
    """The ``.metadata`` of a format-1 checkpoint, unpickled with the allow-list above."""

    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointDamaged.at(Path(path), ".metadata is missing") from None
    except Exception as e:  # noqa: BLE001 - any failure of a tampered or truncated pickle
        raise CheckpointDamaged.at(Path(path), f".metadata is not DCP metadata, refused without running it "
                                   f"({' '.join(str(e).split())[:160] or type(e).__name__})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) or not isinstance(
            metadata.storage_data, dict):
        raise CheckpointDamaged.at(Path(path), ".metadata is not DCP metadata")
    return metadata


def legacy_values(path: Path, metadata) -> dict:
    """The plain values (step, counters, data position) of a format-1 checkpoint. DCP stored each one
    with torch.save; they are read with torch.load(weights_only=True), which builds plain data only."""

    where = {index.fqn: info for index, info in metadata.storage_data.items()}
    values: dict = {}
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, BytesStorageMetadata) or not key.startswith(("trainer.", "ema.num_updates", "data.")):
            continue
        info = where.get(key)
        if info is None:
            raise CheckpointDamaged.at(path, f".metadata has no storage for '{key}'")
        file = path / str(info.relative_path)
        with open(file, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        try:
            value = torch.load(io.BytesIO(raw), weights_only=True)
        except Exception:  # noqa: BLE001
            raise CheckpointDamaged.at(path, f"{file.name} holds a value for '{key}' that is not plain data (refused "
                                             f"without "
                                 f"running it)") from None
        parts = key.split(".")
        if parts[0] == "data" and len(parts) > 2 and parts[1] == "skipped":
            parts = ["data", "skipped", ".".join(parts[2:])]  # skip reasons may hold dots
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return values


def legacy_reader(path: Path):

    class LegacyReader(FileSystemReader):
        """DCP's reader with the allow-list unpickler for .metadata (tensors: torch.load(weights_only=True))."""

        current_file: str | None = None

        def read_metadata(self, *args, **kwargs):
            metadata = read_legacy_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def _slice_file(self, file, sinfo):
            self.current_file = Path(getattr(file, "name", "")).name or None
            return super()._slice_file(file, sinfo)

    return LegacyReader(path)
