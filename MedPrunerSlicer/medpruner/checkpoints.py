"""Where a model comes from: a checkpoint folder, or a hub id cached on this machine (or reachable).

Kept free of torch and transformers, so the command line can say what is wrong with `--model` in a
fraction of a second, before the heavy imports.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelLoadError

__all__ = ["check_model_reachable"]


def _local_checkpoint(name: str) -> str:
    """A name written as a path ('/..', './..', '~/..', 'a/b/c', 'C:\\..') must be an existing folder:
    say so plainly instead of letting the hub client judge it as a malformed repo id."""
    path = Path(name).expanduser()
    written_as_path = (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
                       or bool(path.drive))
    if not written_as_path:
        return name
    if not path.exists():
        raise ModelLoadError(f"No checkpoint folder at {name!r}: it does not exist.",
                             "Give the folder that holds config.json and the weights, or a hub id such as "
                             "Qwen/Qwen3-VL-2B-Instruct.")
    if not path.is_dir():
        raise ModelLoadError(f"{name!r} is a file; a checkpoint is a folder.",
                             "Give the folder that holds config.json and the weights.")
    return str(path) if name.startswith("~") else name


def check_model_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail at once, with what to do, when `name` is a hub id that is not cached here and the hub cannot be
    reached (the hub client would otherwise retry for about half a minute before saying so)."""
    name = _local_checkpoint(os.fspath(name))
    if Path(name).expanduser().is_dir():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except Exception:   # noqa: BLE001 - a malformed id: let from_pretrained say what is wrong
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not offline:
        import socket
        from urllib.parse import urlsplit

        endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout).close()
            return
        except OSError:
            pass
    raise ModelLoadError(
        f"{name!r} is neither a checkpoint folder nor a model cached on this machine, and the model hub "
        f"{'is switched off (HF_HUB_OFFLINE)' if offline else 'cannot be reached from here'}.",
        "Give the folder of a downloaded checkpoint (download it on a machine with network access), or tiny for "
        "the demo model.",
    )


