"""Filter stage: the base model answers every question `filter.runs` times; labels, splits, exports, report.

Items are QA rows (item id = qa id). A shard reads each of its videos once (the frames `filter.num_frames`
or `filter.fps` take across the whole source video, with the one frame-sampling function; sized under the
video token budget, `filter.tokens_per_frame` / `max_video_tokens`; with the `hf` backend
`filter.prefetch_workers` processes read and resize the next videos while the model answers a batch,
`tasks.media.frames.iter_frames_by_video`), puts every question
to the base model in the training prompt format (`tasks.grading.prompts`) and draws all of its answers
in one batched generation (`tasks.filter.rollouts`), grades them (`tasks.grading.answers`; open-ended
misses by the `judge:` section's LLM judge when set, `tasks.grading.judge`) and writes one row per question (`filter/`) and one per answer
(`filter/_rollouts/`).

Labels and splits need the whole dataset, so `finalize` sets them (`tasks.filter.labels`; shard
results hold "pending"), then writes the exports (`filter/_exports/`, `tasks.filter.exports`) and the
report (`<workdir>/report/filter.md` and PNGs) before the engine publishes. Only the rollout
settings key the shards (`shard_settings`): changing thresholds, split rules or the report reruns
the stage in seconds, reusing every answer already drawn.

Failure rows (the run goes on): a question whose video is not in `clip/_videos`
(`unknown_video`) or cannot be read (`unreadable_video`), a malformed item (`bad_item`), a judge
that gives no usable verdict after retries (`judge_<kind>`). An unreachable judge fails the shard (a
rerun judges it); the stage stops when the judge endpoint refuses us (401/403/404), its key's variable
is unset, or it refused every request: every item would fail the same way.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pyarrow as pa

from data_schemas import (
    FILTER,
    FILTER_ROLLOUTS,
    QA,
    VIDEOS,
    TableSchema,
)
from models.prefetch import Prefetcher
from models.video import SampledFrames
from models.vlm import Generation
from tasks.config import FilterConfig
from tasks.engine.stage import (
    ShardResult,
    Stage,
    StageContext,
    WorkItem,
    read_stage_table,
)
from tasks.engine.store import Failure, stable_hash
from tasks.filter.exports import EXPORTS_DIR, write_exports
from tasks.filter.labels import label_rows, reasoning_words
from tasks.filter.report import REPORT_FILE, write_filter_report
from tasks.filter.rollouts import HFSampler, RolloutRequest, Sampler, make_sampler
from tasks.grading.answers import AnswerKey, Grade, grade
from tasks.grading.judge import (
    check_judge_reached,
    judge_all,
    judge_failure,
    judge_identity,
)
from tasks.grading.prompts import (
    posable_items,
    prompt_fingerprint,
    prompt_messages,
    user_prompt,
)
from tasks.media.frames import answer_in_batches, frames_by_video, iter_frames_by_video
from tasks.report.markdown import inline_images, read_report_file

log = logging.getLogger("lvr.filter")

# What an answer depends on; everything else only changes labels, splits, exports or the report.
ROLLOUT_SETTINGS = (
    "backend", "model", "revision", "trust_remote_code", "runs", "temperature", "top_p", "seed", "num_frames", "max_new_tokens",
    "batch_size", "judge", "prompt_version", "fps", "max_frames", "tokens_per_frame", "max_video_tokens", "local_builds",
)
ITEM_COLUMNS = ("qa_id", "video_id", "category", "question_type", "question", "options", "answer", "target")
PENDING = "pending"  # difficulty and split of a shard row, until finalize labels the whole dataset
ROLLOUTS_DIR = "_rollouts"


class FilterStage(Stage):
    name = "filter"
    code_version = "2"  # 2: mRoPE positions as the checkpoint was trained (models.positions)
    inputs = ("qa", "clip")
    output = FILTER
    side_outputs = (FILTER_ROLLOUTS,)
    item_columns = {FILTER.name: "qa_id", FILTER_ROLLOUTS.name: "qa_id"}

    def __init__(self) -> None:
        self._sampler: Sampler | None = None
        self._prefetcher: Prefetcher | None = None
        self._lock = threading.Lock()

    def settings(self, ctx: StageContext) -> dict[str, Any]:
        settings = super().settings(ctx)
        settings["prompt_version"] = prompt_fingerprint()
        if ctx.config.judge.model:  # the judge's verdicts are part of the grades
            settings["judge"] = judge_identity(ctx.config.judge)
        return settings

    def shard_settings(self, ctx: StageContext) -> dict[str, Any]:
        settings = self.settings(ctx)
        return {key: settings[key] for key in ROLLOUT_SETTINGS if key in settings}

    def table_dir(self, ctx: StageContext, schema: TableSchema) -> str:
        if schema.name == FILTER_ROLLOUTS.name:
            return ctx.stage_path(self.name, ROLLOUTS_DIR)
        return super().table_dir(ctx, schema)

    def list_items(self, ctx: StageContext) -> list[WorkItem]:
        videos = {r["video_id"]: r["uri"] for r in read_stage_table(ctx.workdir, "clip", VIDEOS, "_videos").to_pylist()}
        items = []
        for row in read_stage_table(ctx.workdir, "qa", QA).select(list(ITEM_COLUMNS)).to_pylist():
            payload = {**row, "video_uri": videos.get(row["video_id"])}
            items.append(WorkItem(row["qa_id"], key=stable_hash(payload), payload=payload))
        return items

    def sampler(self, ctx: StageContext) -> Sampler:
        # Loaded once per stage run and shared by its shards: loading a model dwarfs a shard.
        with self._lock:
            if self._sampler is None:
                prefetcher = self._prefetcher_locked(ctx)
                if prefetcher is not None:
                    prefetcher.start()  # while the model loads
                self._sampler = make_sampler(ctx.config.filter)
            return self._sampler

    def prefetcher(self, ctx: StageContext) -> Prefetcher | None:
        """The frame readers shared by the shards of a run (`hf` backend; vLLM takes a shard in one
        call), closed by `finalize`; None with `filter.prefetch_workers` 0."""
        with self._lock:
            return self._prefetcher_locked(ctx)

    def _prefetcher_locked(self, ctx: StageContext) -> Prefetcher | None:
        cfg = ctx.config.filter
        if cfg.backend != "hf" or not cfg.prefetch_workers:
            return None
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(cfg.prefetch_workers, max(cfg.prefetch_depth, cfg.batch_size))
        return self._prefetcher

    def _answers(
        self, ctx: StageContext, posable: list[WorkItem], failures: list[Failure]
    ) -> tuple[list[tuple[WorkItem, SampledFrames]], list[list[Generation]]]:
        """The items whose video was read, with its frames and their answers; failure rows for the
        others appended to `failures`."""
        cfg = ctx.config.filter
        prefetcher = self.prefetcher(ctx)
        if prefetcher is None or not any(it.payload["video_uri"] for it in posable):  # read the whole shard, then answer it
            ready, unreadable = frames_by_video(posable, cfg.frame_sampling())
            failures += unreadable
            requests = [self._request(it, frames) for it, frames in ready]
            return ready, (self.sampler(ctx).sample(requests) if requests else [])
        sampler = self.sampler(ctx)
        # Resized in the workers only for the model they are resized for.
        preprocess, budget = (sampler.lm.preprocess, cfg.video_budget()) if isinstance(sampler, HFSampler) else (None, None)
        pairs = iter_frames_by_video(posable, cfg.frame_sampling(), failures, prefetcher, preprocess, budget)
        # `batch_size` questions per call, the batches HFSampler would make of the whole shard: the same seeds.
        return answer_in_batches(
            pairs, cfg.batch_size, lambda batch: sampler.sample([self._request(it, frames) for it, frames in batch]), prefetcher,
        )

    @staticmethod
    def _request(item: WorkItem, frames: SampledFrames) -> RolloutRequest:
        p = item.payload
        return RolloutRequest(item.item_id, prompt_messages(p["question"], p["question_type"], p["options"]), frames)

    def process_shard(self, ctx: StageContext, items: list[WorkItem]) -> ShardResult:
        cfg = ctx.config.filter
        posable, failures = posable_items(items)
        ready, generations = self._answers(ctx, posable, failures)
        keys = [AnswerKey.from_row(it.payload) for it, _ in ready]
        plain = [[grade(g.text, key) for g in gens] for key, gens in zip(keys, generations)]
        judge = ctx.config.judge
        grades: list[list[Grade] | BaseException] = judge_all(judge, list(zip(keys, plain))) if judge.model else list(plain)

        rows: list[dict[str, Any]] = []
        rollouts: list[dict[str, Any]] = []
        for (item, frames), gens, item_grades in zip(ready, generations, grades):
            if isinstance(item_grades, BaseException):
                failures.append(judge_failure(self.name, item.item_id, item_grades))
                continue
            rows.append(self._row(cfg, item, frames, item_grades))
            rollouts += [self._rollout(cfg, item.item_id, run, gen, g) for run, (gen, g) in enumerate(zip(gens, item_grades))]
        return ShardResult({FILTER.name: FILTER.from_rows(rows), FILTER_ROLLOUTS.name: FILTER_ROLLOUTS.from_rows(rollouts)}, failures)

    @staticmethod
    def _row(cfg: FilterConfig, item: WorkItem, frames: SampledFrames, grades: list[Grade]) -> dict[str, Any]:
        p = item.payload
        n_correct = sum(g.correct for g in grades)
        return {
            **{k: p[k] for k in ITEM_COLUMNS},
            "video_uri": p["video_uri"],
            "prompt": user_prompt(p["question"], p["question_type"], p["options"]),
            "n_runs": len(grades),
            "n_correct": n_correct,
            "n_format_ok": sum(g.format_ok for g in grades),
            "pass_rate": n_correct / len(grades),
            "difficulty": PENDING,
            "reasoning_words": reasoning_words(p["target"]),
            "quality": 0.0,
            "split": PENDING,
            "model": cfg.model,
            "num_frames": len(frames),
        }

    @staticmethod
    def _rollout(cfg: FilterConfig, qa_id: str, run: int, gen: Generation, g: Grade) -> dict[str, Any]:
        return {
            "qa_id": qa_id, "run": run, "response": gen.text, "predicted": g.predicted, "correct": g.correct,
            "format_ok": g.format_ok, "grader": g.method, "tokens_out": gen.tokens_out, "finished": gen.finished, "model": cfg.model,
        }

    def finalize(
        self, ctx: StageContext, tables: dict[str, pa.Table], failures: list[Failure]
    ) -> tuple[dict[str, pa.Table], list[Failure]]:
        cfg = ctx.config.filter
        with self._lock:  # every shard is answered
            if self._prefetcher is not None:
                self._prefetcher.close()
        check_judge_reached(self.name, failures, "judge" in set(tables[FILTER_ROLLOUTS.name]["grader"].to_pylist()))
        rows = label_rows(tables[FILTER.name].to_pylist(), cfg)
        rollouts = tables[FILTER_ROLLOUTS.name].sort_by([("qa_id", "ascending"), ("run", "ascending")])
        exports = ctx.stage_path(self.name, EXPORTS_DIR)
        write_exports(ctx.workdir.fs, exports, rows)
        write_filter_report(ctx.workdir, rows, rollouts, failures, cfg, ctx.workdir.uri(self.name, EXPORTS_DIR))
        log.info("filter: %d items labelled; exports in %s, report in %s", len(rows), exports, ctx.workdir.uri("report", REPORT_FILE))
        return {FILTER.name: FILTER.from_rows(rows), FILTER_ROLLOUTS.name: rollouts}, failures

    def report_markdown(self, ctx: StageContext, manifest: dict[str, Any]) -> str | None:
        data = read_report_file(ctx.workdir, REPORT_FILE)
        return inline_images(data.decode(), ctx.workdir) if data is not None else None
