"""QA stage: question-reasoning-answer items from all captions of a video, then refined reasoning.

Items are videos. For each video and each configured category x question type, one generation
request (`qa.questions_per_request` questions); every valid item it yields gets one refinement
request; a refined item becomes a row with its training target. With `qa.context_tokens` set, a
video whose prompt would not fit the endpoint's context is split into windows of consecutive
captions (`tasks.qa.windows`), each asked all those requests; each row records its window.
Requests of a shard run concurrently (asyncio, at most `qa.concurrency` in flight) and rows come
out in a fixed order whatever order answers arrive in.

Failure rows (the run goes on), keyed by video id like the rows (so the engine can reuse a video's
rows and failures together), the message naming the request (`<video>/<category>/<type>`) and the
qa id when there is one: an answer that does not parse or an item that fails validation (kind from
`tasks.qa.parser`, detail = the raw answer), a request that still fails after its retries
(`request_<kind>`, `refine_request_<kind>`), a video (or a window of one) with fewer than two
captioned clips (`too_few_clips`), a caption too long for a context window even alone
(`caption_too_long`), a question asked twice for a video, in one window or two
(`duplicate_question`). A video asked about in windows names the window in its requests
(`<video>/window <i>/<category>/<type>`). The stage stops instead when failing on would be wrong:
the endpoint refuses us (401/403/404: the key, the model or the URL is wrong), the key's variable
is unset, `qa.context_tokens` leaves no room for a caption line next to the prompt and
`qa.max_tokens`, or every request of a shard failed (the endpoint is down): publishing a dataset of
failure rows would then be cached as if complete.

Special-token markers in any generated text (`<|im_end|>` in a question, `<|video_pad|>` quoted from a
caption) are broken into plain text before the item is refined or becomes a row
(`tasks.grading.prompts.neutralise_special_tokens`); the stage report counts them.

Every LLM answer is cached on disk (`tasks.qa.cache`) before it is used, so a rerun after a crash,
or after a change that only concerns refinement, pays only for requests never answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from typing import Any

from data_schemas import (
    CAPTIONS,
    FAILURES,
    INPUT_FAULT,
    OUTPUT_FAULT,
    QA,
    REQUEST_FAULT,
)
from models.openai_client import ChatRequestError
from tasks.config import QAConfig
from tasks.engine.stage import (
    ShardResult,
    Stage,
    StageContext,
    StageError,
    WorkItem,
    read_stage_table,
)
from tasks.engine.store import FAILURES_FILE, Failure, read_table_file, stable_hash
from tasks.grading.prompts import count_neutralised, neutralise_special_tokens
from tasks.media.timecode import time_range
from tasks.qa import template
from tasks.qa.backends import GENERATE, REFINE, Answer, Backend, make_backend
from tasks.qa.cache import CACHE_DIR, AnswerCache
from tasks.qa.captions import VideoCaptions, Window, videos_from_rows
from tasks.qa.parser import ParsedItem, ParseFailure, parse_generation, parse_refinement
from tasks.qa.prompts import WINDOW_FILE, PromptError, PromptSet
from tasks.qa.refine import build_target
from tasks.qa.windows import CaptionTooLong, NoRoom, plan_windows

log = logging.getLogger("lvr.qa")

MIN_CLIPS = 2  # the questions must need several clips
CAPTION_COLUMNS = ["clip_id", "video_id", "start_s", "end_s", "caption"]


def qa_id(video_id: str, category: str, question_type: str, question: str) -> str:
    return stable_hash({"video_id": video_id, "category": category, "question_type": question_type, "question": question})


def request_id(video_id: str, category: str, question_type: str, window: Window | None = None) -> str:
    """`<video>/<category>/<type>`; a part of a video (one of several windows) adds `/window <i>` after the video."""
    where = video_id if window is None or window.whole else f"{video_id}/window {window.index}"
    return f"{where}/{category}/{question_type}"


class QAStage(Stage):
    name = "qa"
    code_version = "3"  # 2: special tokens in generated texts neutralised; 3: context windows (window columns)
    inputs = ("caption",)
    output = QA
    item_columns = {QA.name: "video_id"}

    def settings(self, ctx: StageContext) -> dict[str, Any]:
        settings = super().settings(ctx)
        cfg = ctx.config.qa
        try:  # the prompt files' text, so editing a template reruns the stage even without a new version
            generate = PromptSet(GENERATE, cfg.prompt_version)
            settings["prompt_files"] = {GENERATE: generate.fingerprint(), REFINE: PromptSet(REFINE, cfg.refine_prompt_version).fingerprint()}
            if cfg.context_tokens is not None:
                generate.text(WINDOW_FILE)  # windows need it: fail before any request, not on the first long video
        except PromptError as exc:
            raise StageError(f"qa: {exc}") from None
        if cfg.backend == "template":  # its drafts change with its code, not with any setting
            settings["template_version"] = template.TEMPLATE_VERSION
        return settings

    def list_items(self, ctx: StageContext) -> list[WorkItem]:
        table = read_stage_table(ctx.workdir, "caption", CAPTIONS).select(CAPTION_COLUMNS)
        return [
            WorkItem(
                item_id=video.video_id,
                key=stable_hash([(c.clip_id, c.start_s, c.end_s, c.caption) for c in video.clips]),
                payload={"video": video},
            )
            for video in videos_from_rows(table.to_pylist())
        ]

    def process_shard(self, ctx: StageContext, items: list[WorkItem]) -> ShardResult:
        cache = AnswerCache(ctx.workdir.fs, ctx.stage_path(self.name, CACHE_DIR))
        rows, failures = asyncio.run(run_videos(ctx.config.qa, cache, [it.payload["video"] for it in items]))
        return ShardResult({QA.name: QA.from_rows(rows)}, failures)

    def report_markdown(self, ctx: StageContext, manifest: dict[str, Any]) -> str | None:
        """Items per category and question type, and failures per kind: where generation goes wrong."""
        items = Counter(zip(*read_stage_table(ctx.workdir, self.name, QA).select(["category", "question_type"]).to_pydict().values()))
        kinds = Counter(read_table_file(ctx.workdir.fs, ctx.stage_path(self.name, FAILURES_FILE), FAILURES).column("error_kind").to_pylist())
        lines = ["| category | question type | items |", "|---|---|---|"]
        lines += [f"| {c} | {t} | {n} |" for (c, t), n in sorted(items.items())]
        lines += ["", "| failure kind | count |", "|---|---|"] + [f"| `{k}` | {n} |" for k, n in kinds.most_common()]
        texts = read_stage_table(ctx.workdir, self.name, QA).select(["question", "options", "answer", "reasoning", "refined_reasoning"])
        columns = texts.to_pydict()
        options = [o for opts in columns.pop("options") for o in opts or ()]
        neutralised = count_neutralised([*options, *(t for column in columns.values() for t in column)])
        lines += ["", f"Special tokens neutralised in questions, options, answers and reasoning: {neutralised}"]
        return "\n".join(lines)


async def run_videos(cfg: QAConfig, cache: AnswerCache, videos: list[VideoCaptions]) -> tuple[list[dict[str, Any]], list[Failure]]:
    """Rows and failures of a batch of videos, in a deterministic order."""
    backend = make_backend(cfg, cache)
    prompts = PromptSet(GENERATE, cfg.prompt_version)  # what windows are measured with, whatever the backend
    try:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(_video(cfg, backend, prompts, video)) for video in videos]
        except ExceptionGroup as group:  # a fatal or transient endpoint error cancels the shard's other requests
            first = group.exceptions[0]
            if isinstance(first, ChatRequestError):  # transient: the endpoint, not a video, failed
                raise StageError(
                    f"qa: the endpoint failed ({first}) after {first.attempts} attempt(s); the shard is redone by Prefect's "
                    "retry or the next run, and the answers received so far are cached"
                ) from first
            raise first from None
    finally:
        await backend.aclose()
    rows: list[dict[str, Any]] = []
    failures: list[Failure] = []
    for task in tasks:
        video_rows, video_failures = task.result()
        rows += video_rows
        failures += video_failures
    stats = backend.stats
    log.info(
        "qa: %d videos, %d rows, %d failures; generation %d sent / %d cached, refinement %d sent / %d cached, %d requests failed",
        len(videos), len(rows), len(failures), stats.sent[GENERATE], stats.cached[GENERATE], stats.sent[REFINE], stats.cached[REFINE], stats.failed,
    )
    answered = sum(stats.sent.values()) + sum(stats.cached.values()) - stats.failed
    if stats.failed and answered == 0:
        reason = next((f.message for f in failures if f.error_kind.startswith(("request_", "refine_request_"))), "")
        raise StageError(
            f"qa: all {stats.failed} requests of this shard failed ({reason}); the endpoint looks unreachable, so nothing "
            "is published. Fix it and rerun: answered requests are cached."
        )
    return rows, failures


async def _video(cfg: QAConfig, backend: Backend, prompts: PromptSet, video: VideoCaptions) -> tuple[list[dict[str, Any]], list[Failure]]:
    if len(video.clips) < MIN_CLIPS:
        return [], [Failure(video.video_id, "too_few_clips", f"{len(video.clips)} captioned clip(s); questions need at least {MIN_CLIPS}")]
    kinds = [(category, qtype) for category in cfg.categories for qtype in cfg.question_types]
    try:
        windows = plan_windows(prompts, video, kinds, cfg.questions_per_request, cfg.max_tokens, cfg.context_tokens)
    except CaptionTooLong as exc:
        return [], [Failure(video.video_id, "caption_too_long", f"{video.video_id}: {exc}", failure_class=INPUT_FAULT)]
    except NoRoom as exc:
        raise StageError(f"qa: {exc}; raise qa.context_tokens or lower qa.max_tokens") from None
    failures: list[Failure] = []
    asked = []
    for window in windows:
        if len(window.clips) < MIN_CLIPS:  # only a part of a video with very long captions around it
            span = time_range(window.start_s, window.end_s)
            failures.append(Failure(video.video_id, "too_few_clips", f"{video.video_id}/window {window.index} ({span}): "
                                    f"{len(window.clips)} captioned clip(s) fit this window; questions need at least {MIN_CLIPS}"))
        else:
            asked.append(window)
    results = await asyncio.gather(*(_request(cfg, backend, window, category, qtype) for window in asked for category, qtype in kinds))
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for request_rows, request_failures in results:
        failures += request_failures
        for row in request_rows:
            if row["qa_id"] in seen:
                failures.append(Failure(video.video_id, "duplicate_question", f"qa {row['qa_id']}: asked twice: {row['question']!r}",
                                        failure_class=OUTPUT_FAULT))
                continue
            seen.add(row["qa_id"])
            rows.append(row)
    return rows, failures


async def _request(
    cfg: QAConfig, backend: Backend, window: Window, category: str, qtype: str
) -> tuple[list[dict[str, Any]], list[Failure]]:
    """One generation request about a window of a video, then one refinement per valid item it yields."""
    video = window.video
    rid = request_id(video.video_id, category, qtype, window)
    try:
        generated = await backend.generate(window, category, qtype, cfg.questions_per_request)
    except ChatRequestError as exc:
        if exc.transient:
            raise
        return [], [Failure(video.video_id, f"request_{exc.kind}", f"{rid}: no answer after {exc.attempts} attempt(s): {exc}",
                            failure_class=REQUEST_FAULT)]
    if generated is None:
        log.debug("qa: %s cannot be formed from this video's captions", rid)
        return [], []
    result = generated.result
    parsed = parse_generation(result.content, qtype, finish_reason=result.finish_reason)
    raw = result.raw_text()
    failures = [
        Failure(video.video_id, f.kind, f"{_where(rid, video.video_id, category, qtype, f.question)}: {f.message}", raw, OUTPUT_FAULT)
        for f in parsed.failures
    ]
    items = [_neutralised(item) for item in parsed.items]
    ids = [qa_id(video.video_id, category, qtype, item.question) for item in items]
    refined = await asyncio.gather(*(_refine(backend, item, video.video_id, f"{rid} qa {i}") for item, i in zip(items, ids)))
    rows = []
    for item, item_id, outcome in zip(items, ids, refined):
        if isinstance(outcome, Failure):
            failures.append(outcome)
        else:
            rows.append(_row(item_id, window, category, qtype, item, generated, *outcome, backend))
    return rows, failures


def _neutralised(item: ParsedItem) -> ParsedItem:
    """The item with special tokens broken in every text: they become the prompt and the target."""
    def plain(text: str) -> str:
        return neutralise_special_tokens(text)[0]

    options = tuple(plain(o) for o in item.options) if item.options is not None else None
    return dataclasses.replace(item, question=plain(item.question), options=options, answer=plain(item.answer), reasoning=plain(item.reasoning))


def _where(rid: str, video_id: str, category: str, qtype: str, question: str | None) -> str:
    return f"{rid} qa {qa_id(video_id, category, qtype, question)}" if question else rid


async def _refine(backend: Backend, item: ParsedItem, video_id: str, where: str) -> tuple[Answer, str] | Failure:
    try:
        answer = await backend.refine(item)
    except ChatRequestError as exc:
        if exc.transient:
            raise
        return Failure(video_id, f"refine_request_{exc.kind}", f"{where}: refinement got no answer after {exc.attempts} attempt(s): {exc}",
                       failure_class=REQUEST_FAULT)
    result = answer.result
    try:
        text = parse_refinement(result.content, finish_reason=result.finish_reason)
    except ParseFailure as exc:
        return Failure(video_id, exc.kind, f"{where}: {exc.message}", result.raw_text(), OUTPUT_FAULT)
    return answer, neutralise_special_tokens(text)[0]


def _row(
    item_id: str, window: Window, category: str, qtype: str, item: ParsedItem,
    generated: Answer, refined: Answer, refined_text: str, backend: Backend,
) -> dict[str, Any]:
    gen, ref = generated.result, refined.result
    return {
        "qa_id": item_id,
        "video_id": window.video.video_id,
        "category": category,
        "question_type": qtype,
        "question": item.question,
        "options": list(item.options) if item.options is not None else None,
        "answer": item.answer,
        "reasoning": item.reasoning,
        "refined_reasoning": refined_text,
        "target": build_target(refined_text, item.answer),
        "generator_model": backend.generator_model,
        "refiner_model": backend.refiner_model,
        "prompt_version": generated.prompt_version,
        "refine_prompt_version": refined.prompt_version,
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "reasoning_tokens": gen.reasoning_tokens,
        "refine_prompt_tokens": ref.prompt_tokens,
        "refine_completion_tokens": ref.completion_tokens,
        "refine_reasoning_tokens": ref.reasoning_tokens,
        "generation_key": generated.key,
        "refine_key": refined.key,
        "window_index": window.index,
        "window_start_s": window.start_s,
        "window_end_s": window.end_s,
    }
