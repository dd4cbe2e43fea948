"""Models stored in a workdir, as local folders for `from_pretrained`: downloaded once per
(URI, identity) into `<cache>/models/`."""

from __future__ import annotations

import logging
import threading

from models.tiny import TINY_SHAPES, build_key
from tasks.config import cache_dir
from tasks.engine.store import is_local_uri, stable_hash, url_to_fs
from tasks.training.staging import pull_dir

log = logging.getLogger("lvr.staging")

MODELS_DIR = "models"  # under cache_dir(): models downloaded from workdirs
_MODELS_LOCK = threading.Lock()


def model_identity(ref: str, revision: str | None) -> str:
    """What names a base model's weights in fingerprints: its reference and, when pinned, its revision
    (left out when unpinned, so the identities of unpinned models stay what they were); for a locally
    built model, what its build follows from (`models.tiny.build_key`)."""
    build = {"build": build_key(ref)} if ref in TINY_SHAPES else {}
    return stable_hash({"ref": ref, **({"revision": revision} if revision else {}), **build})


def local_model(uri: str, identity: str) -> str:
    """A model folder as a local path for `from_pretrained`: itself when local (or a model id),
    else a copy under `<cache>/models/` downloaded once per (URI, identity), where identity is
    what changes when the folder is rewritten (the producing stage's manifest fingerprint)."""
    if is_local_uri(uri):
        return uri
    dest = cache_dir() / MODELS_DIR / stable_hash({"uri": uri, "identity": identity})
    with _MODELS_LOCK:  # eval shards in threads ask for the same model at once: download it once
        if not dest.is_dir():
            fs, path = url_to_fs(uri)
            log.info("downloading model %s to %s", uri, dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not pull_dir(fs, path, dest, replace=False):
                raise FileNotFoundError(f"no model files under {uri}")
    return str(dest)
