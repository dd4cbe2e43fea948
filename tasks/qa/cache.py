"""LLM answers cached on disk, so that no request is ever paid for twice.

One JSON file per answered request at `<root>/<kind>/<key[:2]>/<key>.json`, written atomically
through the workdir's filesystem (local or object storage). The key hashes exactly what determines
the answer: the messages, the model and the sampling parameters, nothing about transport (endpoint,
streaming, timeouts) and never the API key. Generation and refinement live under separate kinds, so
a new refinement prompt or model misses only the refinement cache.

Only answered requests are stored: a transport failure is not an answer and is retried on the next
run. A truncated answer (`finish_reason=length`) is stored: it is what the model says to that
request, and asking again with the same `max_tokens` would pay for the same cut; raising
`qa.max_tokens` changes the key and asks anew.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any

import fsspec

from models.openai_client import ChatResult
from tasks.engine.store import read_json, stable_hash, write_json_atomic

CACHE_DIR = "_llm_cache"  # under the stage's directory; "_" keeps it out of the stage's table


def request_key(messages: list[dict[str, Any]], model: str, params: dict[str, Any]) -> str:
    return stable_hash({"messages": messages, "model": model, "params": params}, 32)


class AnswerCache:
    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def path(self, kind: str, key: str) -> str:
        return f"{self.root}/{kind}/{key[:2]}/{key}.json"

    def get(self, kind: str, key: str) -> ChatResult | None:
        entry = read_json(self.fs, self.path(kind, key))
        if entry is None or entry.get("key") != key:
            return None
        try:
            return ChatResult(**entry["result"])
        except (KeyError, TypeError):
            return None  # written by an incompatible version: ask again rather than guess

    def put(self, kind: str, key: str, result: ChatResult, meta: dict[str, Any]) -> None:
        entry = {
            "key": key,
            "kind": kind,
            **meta,
            "result": dataclasses.asdict(result),
            "cached_at": datetime.now(timezone.utc).isoformat(),
        }
        write_json_atomic(self.fs, self.path(kind, key), entry)
