"""Caption stage: one VLM caption per clip, resumable per shard like every stage."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from typing import Any

import pyarrow as pa

from data_schemas import CAPTIONS, CLIPS, INPUT_FAULT, OUTPUT_FAULT, REQUEST_FAULT
from models.captioners import (
    REQUEST_FAILED,
    UNREADABLE_CLIP,
    Captioner,
    CaptionResult,
    CaptionSettings,
    ClipRequest,
    HFCaptioner,
    OpenAICaptioner,
    VLLMCaptioner,
    prompt_hash,
)
from tasks.config import CaptionConfig
from tasks.engine.stage import (
    ShardResult,
    Stage,
    StageContext,
    StageError,
    WorkItem,
    read_stage_table,
)
from tasks.engine.store import Failure, stable_hash
from tasks.grading.prompts import count_neutralised, neutralise_special_tokens
from tasks.media.cache import local_copy

log = logging.getLogger("lvr.caption")


def make_captioner(cfg: CaptionConfig) -> Captioner:
    settings = CaptionSettings(
        prompt=cfg.prompt, sampling=cfg.frame_sampling(), max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size, seed=cfg.seed, budget=cfg.video_budget(),
        prefetch_workers=cfg.prefetch_workers, prefetch_depth=cfg.prefetch_depth,
    )
    if cfg.backend == "hf":
        return HFCaptioner(cfg.model, settings, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.backend == "openai":
        return OpenAICaptioner.from_config(cfg, settings)
    return VLLMCaptioner(cfg.model, settings, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)


# C0 control characters other than tab/newline, and the tags our training targets are made of:
# a caption carrying them would corrupt every target built from it.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_RESERVED_TAGS = re.compile(r"</?(?:think|answer)>")


def clean_caption(text: str) -> str:
    """The caption as it enters the dataset: no control characters, no reasoning tags, and special
    tokens (`<|video_pad|>`) broken into plain text, since questions quote captions."""
    text, _ = neutralise_special_tokens(_RESERVED_TAGS.sub(" ", _CONTROL.sub("", text)))
    return text.strip()


def caption_problem(result: CaptionResult) -> tuple[str, str] | None:
    """Why a caption must not enter the dataset, or None when it is fine."""
    if result.error_kind:
        return result.error_kind, result.error or ""
    text = clean_caption(result.caption)
    if not text:
        return "empty_caption", "the model returned no text"
    words = text.split()
    if result.distinct_tokens == 1 or (len(words) > 1 and len(set(words)) == 1):
        return "degenerate_caption", f"a single token repeated: {text[:80]!r}"
    return None




def caption_failure_class(kind: str) -> str:
    """A clip that cannot be read is the input's fault; a refused request the request's; anything
    else (empty, degenerate) is what the model wrote."""
    if kind == UNREADABLE_CLIP:
        return INPUT_FAULT
    return REQUEST_FAULT if kind.startswith(REQUEST_FAILED) else OUTPUT_FAULT


class CaptionStage(Stage):
    name = "caption"
    code_version = "4"  # 2: control characters and reasoning tags removed from captions; 3: special tokens neutralised; 4: mRoPE positions as the checkpoint was trained (models.positions)
    inputs = ("clip",)
    output = CAPTIONS
    item_columns = {CAPTIONS.name: "clip_id"}

    def __init__(self) -> None:
        self._captioner: Captioner | None = None
        self._lock = threading.Lock()

    def list_items(self, ctx: StageContext) -> list[WorkItem]:
        clips = read_stage_table(ctx.workdir, "clip", CLIPS).to_pylist()
        return [
            WorkItem(row["clip_id"], key=stable_hash(row), payload={k: row[k] for k in ("clip_id", "video_id", "clip_uri", "start_s", "end_s")})
            for row in clips
        ]

    def captioner(self, ctx: StageContext) -> Captioner:
        # Loaded once per stage run and shared by its shards: loading a model dwarfs a shard.
        with self._lock:
            if self._captioner is None:
                self._captioner = make_captioner(ctx.config.caption)
            return self._captioner

    def finalize(self, ctx: StageContext, tables: dict[str, pa.Table], failures: list[Failure]) -> tuple[dict[str, pa.Table], list[Failure]]:
        """Every shard is captioned: the model and its frame workers go (later stages of the same
        process need neither, and the workers would otherwise hold the process's exit). A run in
        which every request failed is a broken endpoint, not a dataset without captions."""
        with self._lock:
            if self._captioner is not None:
                self._captioner.close()
                self._captioner = None
        if failures and tables[CAPTIONS.name].num_rows == 0 and all(f.error_kind.startswith(REQUEST_FAILED) for f in failures):
            first = failures[0]
            raise StageError(
                f"caption: every one of the {len(failures)} clips failed (first: {first.error_kind}: {first.message}); "
                "nothing was published"
            )
        return tables, failures

    def process_shard(self, ctx: StageContext, items: list[WorkItem]) -> ShardResult:
        cfg = ctx.config.caption
        captioner = self.captioner(ctx)
        with contextlib.ExitStack() as stack:
            requests = [ClipRequest(it.item_id, str(stack.enter_context(local_copy(it.payload["clip_uri"])))) for it in items]
            results = captioner.caption(requests)
        rows, failures = [], []
        for item, result in zip(items, results):
            problem = caption_problem(result)
            if problem:
                kind, message = problem
                failures.append(Failure(item.item_id, kind, message, result.caption or None, caption_failure_class(kind)))
                continue
            p = item.payload
            rows.append(
                {
                    "clip_id": p["clip_id"], "video_id": p["video_id"], "start_s": p["start_s"], "end_s": p["end_s"],
                    "caption": clean_caption(result.caption), "model": cfg.model, "backend": cfg.backend,
                    "prompt_hash": prompt_hash(cfg.prompt), "frames_used": result.frames_used,
                    "tokens_in": result.tokens_in, "tokens_out": result.tokens_out, "latency_s": round(result.latency_s, 4),
                }
            )
        return ShardResult({CAPTIONS.name: CAPTIONS.from_rows(rows)}, failures)

    def report_markdown(self, ctx: StageContext, manifest: dict[str, Any]) -> str | None:
        """How many special-token markers the captions held (broken by `clean_caption`): a captioner
        that writes them is worth a look."""
        captions = read_stage_table(ctx.workdir, self.name, CAPTIONS).column("caption").to_pylist()
        return f"Special tokens neutralised in captions: {count_neutralised(captions)}"
