"""Loading the Hugging Face models a user names (text encoders, teachers, metric extractors): from a local directory or
the Hugging Face cache first, never running code from their files, and failing in seconds, in one line, when a hub
id is in neither place and the hub cannot be reached.

- **No code from files.** Every ``from_pretrained`` prx calls passes ``trust_remote_code=False``, and a directory (or
  cached snapshot) whose ``config.json`` or tokenizer files map a class to Python code of their own (``auto_map``) is
  refused before transformers reads it, whether or not there is a terminal to ask in.
- **Offline in seconds.** A hub id that is not in the cache stops at once with ``HF_HUB_OFFLINE=1``; otherwise one
  request with a short timeout says whether the hub can be reached at all, and only then does transformers download
  (huggingface_hub would retry an unreachable hub for half a minute).
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from prx.errors import PrxError

PROBE_TIMEOUT = 3.0  # seconds for the one request that says whether a server can be reached
CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value: the Hugging Face cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why ``url``'s server cannot be reached (no network, no DNS, a refused or silent connection), in a few words;
    None when it answers at all (any HTTP status) or when only its certificate is in doubt. One request, no retries,
    at most ``timeout`` seconds whatever the resolver does; proxies are taken from the environment as clients do."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass
        except urllib.error.URLError as e:
            if not isinstance(e.reason, ssl.SSLError):
                outcome.append(" ".join(str(e.reason).split())[:120])
        except (OSError, ValueError) as e:  # a timeout, a reset connection, a malformed URL
            outcome.append(" ".join(str(e).split())[:120] or type(e).__name__)
        outcome.append(None)

    thread = threading.Thread(target=probe, daemon=True)  # name resolution ignores the socket timeout
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer in {timeout:g} s"


def custom_code(directory: Path) -> str | None:
    """What in a model directory asks for Python code of its own (transformers' ``auto_map``), or None."""
    for name in CODE_FILES:
        try:
            data = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            key, value = next(iter(auto_map.items())) if isinstance(auto_map, dict) else ("a class", auto_map)
            return f"its {name} maps {key} to {str(value)[:80]} (auto_map)"
    return None


def cached_snapshot(repo_id: str, filename: str = "config.json") -> Path | None:
    """The cache's snapshot directory of a hub id (where its ``filename`` lies: a model's config.json, a pipeline's
    model_index.json), or None when not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - not a valid repo id, an unreadable cache: not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def brief(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}" if text else type(error).__name__


def load(load_from: Callable[[str, bool], object], name: str, ident: str, what: str, local_option: str,
         gated: bool = False):
    """``load_from(source, local_files_only)`` (it calls ``from_pretrained`` with ``trust_remote_code=False``) for
    ``ident``, a local directory or a hub id (``name``: what the user wrote; ``what``: "text encoder", "teacher";
    ``local_option``: how to pass a local directory instead, e.g. ``text.encoder=DIR``). Every failure is one
    :class:`PrxError` line."""
    local = Path(ident).is_dir()
    where = Path(ident) if local else cached_snapshot(ident)
    if where is not None and (code := custom_code(where)) is not None:
        raise PrxError(f"{what} '{name}' ({where}) needs custom code: {code}. prx runs no code from model files "
                       f"(trust_remote_code=False): use a model that transformers supports itself")
    if local:
        try:
            return load_from(ident, True)
        except PrxError:  # prx's own one line (e.g. text.num_layers beyond the model's)
            raise
        except Exception as e:  # noqa: BLE001 - any failure of files a user points at is one line
            raise PrxError(f"{what} '{name}' could not be loaded from the local directory {ident} ({brief(e)}): it "
                           f"must hold config.json and the weights (and tokenizer files) written by save_pretrained"
                           ) from None
    if ident.startswith(("/", ".", "~")) or ident.count("/") > 1 or "\\" in ident:  # a path, not ORG/NAME
        raise PrxError(f"{what} '{name}' could not be loaded: there is no local directory {ident} (and it is not a "
                       f"hub id, which reads NAME or ORG/NAME): pass a directory holding config.json and the weights, "
                       f"{local_option}")
    cached = ""
    if where is not None:  # in the Hugging Face cache: loaded from its snapshot directory, so nothing asks the network
        try:
            return load_from(str(where), True)
        except PrxError:
            raise
        except Exception as e:  # noqa: BLE001
            cached = f" (its cached copy cannot be loaded: {brief(e, 100)})"
    from huggingface_hub import constants

    if offline():
        reason = "HF_HUB_OFFLINE is set"
    else:
        reason = unreachable(f"{constants.ENDPOINT}/api/models/{ident}")
        reason = reason and f"{constants.ENDPOINT} cannot be reached: {reason}"
    if reason is None:  # the hub answers: one download (a machine with network and, for gated models, a token)
        try:
            return load_from(ident, False)
        except PrxError:
            raise
        except Exception as e:  # noqa: BLE001
            reason = brief(e, 120)
    login = " (gated: accept its licence on huggingface.co and log in with `hf auth login` first)" if gated else ""
    raise PrxError(f"{what} '{name}' is not available offline: no local directory '{ident}', and hub id {ident} is not "
                   f"in the Hugging Face cache {cache_dir()}{cached} ({reason}). Download it once with `hf download "
                   f"{ident}`{login} where there is network (HF_HOME shares a cache; HF_HUB_OFFLINE=1 then skips the "
                   f"network), or pass a local directory: {local_option}")
