import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def text_encoder():
    from prx.text import TextEncoder

    return TextEncoder("minilm", max_length=48)


def tiny_config(*overrides: str):
    from prx.config import load_config

    return load_config("tiny", list(overrides))


def tiny_model(text_dim: int = 24, **changes):
    from dataclasses import replace

    from prx.model import build_model

    cfg = tiny_config().model
    return build_model(replace(cfg, text_dim=text_dim, **changes))


@pytest.fixture(scope="session", autouse=True)
def prx_cache(tmp_path_factory):
    """Tiny random teachers are written here, not to ~/.cache."""
    path = tmp_path_factory.mktemp("prx-cache")
    os.environ["PRX_CACHE"] = str(path)
    return path


def files_of_at_most(limit: int) -> None:
    """For a child process (``preexec_fn``): writing a file past ``limit`` bytes fails (EFBIG) as a write to a full
    disk does (ENOSPC), with no disk of that size to mount."""
    import resource
    import signal

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the signal killing the process

