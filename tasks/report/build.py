"""The run report `<workdir>/report/index.html`, built from the workdir alone.

What it reads: `_runs/latest.json` and every stage's manifest (status, rows, wall and work times,
cache hits), each stage's `_failures.parquet`, the filter / qa / clip / eval tables (sample
questions with thumbnails of their clips, the models' answers) and the training metrics. What it
writes beside index.html: the charts (PNG) and thumbnail JPEGs, both also inlined into the page so
the one file can be mailed or opened anywhere. A stage not run yet shows as missing; its charts
and sections are left out.

Charts are redrawn only when their source stage's fingerprint changed (`report/_charts.json`) and
thumbnails are cached per clip (`report/thumbs/`), so `update_report` after each stage is cheap.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from data_schemas import (
    CAPTIONS,
    CLIPS,
    EVAL_ITEMS,
    EVAL_SPLIT,
    EVAL_SUMMARY,
    FAILURES,
    FILTER,
    QA,
    TRAIN_METRICS,
    TableSchema,
)
from models.video import FrameSampling
from tasks.config import FilterConfig
from tasks.engine.manifest import read_manifest
from tasks.engine.runs import LATEST_RUN, RUNS_DIR, workdir_status
from tasks.engine.store import (
    FAILURES_FILE,
    Workdir,
    read_json,
    read_table_file,
    stable_hash,
    write_json_atomic,
)
from tasks.grading.difficulty import difficulty
from tasks.grading.prompts import category_order
from tasks.media.frames import read_video_frames
from tasks.media.timecode import time_range
from tasks.report.accuracy import OVERALL, accuracy_table, paired_comparisons
from tasks.report.charts import (
    ACCURACY_PNG,
    DIFFICULTY_PNG,
    FRAMES_PNG,
    GRPO_REWARD_PNG,
    LOSS_PNG,
    accuracy_chart,
    difficulty_histogram_chart,
    frames_chart,
    loss_chart,
    reward_chart,
    series,
)
from tasks.report.html import (
    AnswerView,
    ChartView,
    ReportData,
    SampleView,
    StageView,
    Thumbnail,
    render,
)
from tasks.report.markdown import REPORT_DIR, read_report_file, write_report_file
from tasks.stages import STAGE_NAMES

log = logging.getLogger("lvr.report")

INDEX = "index.html"
CHARTS_STATE = "_charts.json"
THUMBS_DIR = "thumbs"
CHARTS_VERSION = "1"  # bump when a chart's drawing changes, so cached PNGs are redrawn
FAILURES_SHOWN = 10
SAMPLES = 4
THUMBS_PER_SAMPLE = 4
THUMB_SIZE = (192, 144)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def read_published(workdir: Workdir, manifest: dict[str, Any], schema: TableSchema) -> pa.Table:
    """A stage's published table as its manifest lists it (part files or a single named file)."""
    info = manifest.get("tables", {}).get(schema.name)
    if not info:
        return schema.empty()
    parts = [read_table_file(workdir.fs, workdir.path(info["path"], name), schema) for name in info["files"]]
    return pa.concat_tables(parts) if parts else schema.empty()


# ------------------------------------------------------------------------------------------------
# Charts
# ------------------------------------------------------------------------------------------------
def _difficulty(workdir: Workdir, manifest: dict[str, Any]) -> bytes | None:
    rows = read_published(workdir, manifest, FILTER).select(["category", "n_correct", "n_runs"]).to_pylist()
    if not rows:
        return None
    # The thresholds the stage labelled with (the defaults where its manifest does not say).
    defaults = {k: FilterConfig.model_fields[k].default for k in ("easy_min_pass_rate", "hard_max_pass_rate")}
    easy, hard = ({**defaults, **manifest["config"]}[k] for k in defaults)
    runs = max(r["n_runs"] for r in rows)
    by_category: dict[str, list[int]] = {}
    for r in rows:
        by_category.setdefault(r["category"], []).append(r["n_correct"])
    return difficulty_histogram_chart(
        by_category, runs, lambda k: difficulty(k / runs, easy, hard)
    )


def _sft_loss(workdir: Workdir, manifest: dict[str, Any]) -> bytes | None:
    rows = read_published(workdir, manifest, TRAIN_METRICS).to_pylist()
    loss = series(rows, "loss")
    return loss_chart(loss, series(rows, "lr")) if loss else None


def _grpo_reward(workdir: Workdir, manifest: dict[str, Any]) -> bytes | None:
    return reward_chart(read_published(workdir, manifest, TRAIN_METRICS).to_pylist())


def _eval_accuracy(workdir: Workdir, manifest: dict[str, Any]) -> bytes | None:
    return accuracy_chart(read_published(workdir, manifest, EVAL_SUMMARY).to_pylist(), manifest["config"]["num_frames"])


def _eval_frames(workdir: Workdir, manifest: dict[str, Any]) -> bytes | None:
    return frames_chart(read_published(workdir, manifest, EVAL_SUMMARY).to_pylist(), OVERALL)


@dataclass(frozen=True)
class ChartSpec:
    file: str  # the same names the stages use when they draw the chart themselves
    title: str
    stage: str
    draw: Callable[[Workdir, dict[str, Any]], bytes | None]


CHARTS = (
    ChartSpec(ACCURACY_PNG, "Accuracy per category and model", "eval", _eval_accuracy),
    ChartSpec(FRAMES_PNG, "Accuracy versus frames", "eval", _eval_frames),
    ChartSpec(LOSS_PNG, "SFT loss", "sft", _sft_loss),
    ChartSpec(GRPO_REWARD_PNG, "GRPO reward", "grpo", _grpo_reward),
    ChartSpec(DIFFICULTY_PNG, "Difficulty per category (base model's correct answers)", "filter", _difficulty),
)


def ensure_charts(workdir: Workdir, manifests: dict[str, dict[str, Any] | None]) -> list[ChartView]:
    """Every chart whose stage is complete and has data, redrawn when the stage's fingerprint changed."""
    state_path = workdir.path(REPORT_DIR, CHARTS_STATE)
    state = read_json(workdir.fs, state_path) or {}
    views, changed = [], False
    for spec in CHARTS:
        manifest = manifests.get(spec.stage)
        if manifest is None:
            continue
        key = stable_hash({"fingerprint": manifest["fingerprint"], "charts": CHARTS_VERSION})
        png = read_report_file(workdir, spec.file) if state.get(spec.file) == key else None
        if png is None:
            try:
                png = spec.draw(workdir, manifest)
            except Exception:  # one chart's bad input costs that chart, not the report
                log.warning("report: could not draw %s", spec.file, exc_info=True)
                continue
            if png is None:  # nothing to show (e.g. no frames sweep): drop what an older run drew
                if workdir.fs.exists(workdir.path(REPORT_DIR, spec.file)):
                    workdir.fs.rm(workdir.path(REPORT_DIR, spec.file))
                state.pop(spec.file, None)
                changed = True
                continue
            write_report_file(workdir, spec.file, png)
            state[spec.file] = key
            changed = True
        views.append(ChartView(spec.file, spec.title, spec.stage, png))
    if changed:
        write_json_atomic(workdir.fs, state_path, state)
    return views


# ------------------------------------------------------------------------------------------------
# Thumbnails
# ------------------------------------------------------------------------------------------------
def thumbnail(workdir: Workdir, clip: dict[str, Any]) -> bytes | None:
    """A JPEG of the clip's middle frame (the one frame-sampling function), cached per clip; None
    when the clip cannot be read (the report shows the question without it)."""
    # The clip's file, not only its id, names the thumbnail: clips re-cut with other settings keep their ids.
    name = f"{THUMBS_DIR}/{re.sub(r'[^A-Za-z0-9_.-]', '_', clip['clip_id'])}-{stable_hash(clip['clip_uri'], 8)}.jpg"
    cached = read_report_file(workdir, name)
    if cached is not None:
        return cached
    try:
        frames = read_video_frames(clip["clip_uri"], FrameSampling(num_frames=1, temporal_patch_size=1))
    except Exception as exc:  # a missing clip costs its thumbnail, never the report
        log.info("report: no thumbnail for %s: %s: %s", clip["clip_id"], type(exc).__name__, exc)
        return None
    image = Image.fromarray(frames.frames[0])
    image.thumbnail(THUMB_SIZE)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    write_report_file(workdir, name, buf.getvalue())
    return buf.getvalue()


def _spread(items: list[Any], k: int) -> list[Any]:
    """Up to k items evenly spread from first to last."""
    if len(items) <= k or k == 1:
        return items[:k]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


# ------------------------------------------------------------------------------------------------
# Sample questions
# ------------------------------------------------------------------------------------------------
def _pick_samples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One question per category (eval split first, so the models' answers can be shown), then
    more in qa_id order up to SAMPLES."""
    ranked = sorted(rows, key=lambda r: (r.get("split") != EVAL_SPLIT, r["qa_id"]))
    first = {}
    for r in ranked:
        first.setdefault(r["category"], r)
    chosen = [first[c] for c in category_order(first)][:SAMPLES]
    taken = {r["qa_id"] for r in chosen}
    return chosen + [r for r in ranked if r["qa_id"] not in taken][: SAMPLES - len(chosen)]


def _answers(workdir: Workdir, manifest: dict[str, Any] | None, qa_ids: list[str]) -> dict[str, list[AnswerView]]:
    if manifest is None or not qa_ids:
        return {}
    table = read_published(workdir, manifest, EVAL_ITEMS)
    table = table.filter(pc.is_in(table["qa_id"], value_set=pa.array(qa_ids)))
    table = table.filter(pc.equal(table["num_frames"], manifest["config"]["num_frames"]))
    out: dict[str, list[AnswerView]] = {}
    for r in table.to_pylist():
        out.setdefault(r["qa_id"], []).append(AnswerView(r["model"], r["num_frames"], r["prediction"], r["correct"], r["response"]))
    return out


def collect_samples(workdir: Workdir, manifests: dict[str, dict[str, Any] | None]) -> list[SampleView]:
    if manifests.get("filter") is not None:
        rows = read_published(workdir, manifests["filter"], FILTER).to_pylist()
        for r in rows:
            found = _THINK.search(r["target"])
            r["reasoning"] = found.group(1).strip() if found else r["target"]
            r["labels"] = [f"split {r['split']}", f"{r['difficulty']} ({r['n_correct']}/{r['n_runs']} base answers right)"]
    elif manifests.get("qa") is not None:
        rows = read_published(workdir, manifests["qa"], QA).to_pylist()
        for r in rows:
            r["reasoning"] = r["refined_reasoning"]
            r["labels"] = []
    else:
        return []
    picked = _pick_samples(rows)
    answers = _answers(workdir, manifests.get("eval"), [r["qa_id"] for r in picked])
    clips: dict[str, list[dict[str, Any]]] = {}
    if manifests.get("clip") is not None:
        for clip in read_published(workdir, manifests["clip"], CLIPS).select(["clip_id", "video_id", "clip_uri", "start_s", "end_s"]).to_pylist():
            clips.setdefault(clip["video_id"], []).append(clip)
    captions: dict[str, str] = {}
    if manifests.get("caption") is not None:
        table = read_published(workdir, manifests["caption"], CAPTIONS).select(["clip_id", "caption"])
        captions = dict(zip(table["clip_id"].to_pylist(), table["caption"].to_pylist()))
    samples = []
    for r in picked:
        video_clips = _spread(sorted(clips.get(r["video_id"], []), key=lambda c: c["start_s"]), THUMBS_PER_SAMPLE)
        thumbs = [
            Thumbnail(image, time_range(c["start_s"], c["end_s"]), captions.get(c["clip_id"]))
            for c, image in ((c, thumbnail(workdir, c)) for c in video_clips)
            if image is not None
        ]
        samples.append(
            SampleView(
                r["qa_id"], r["video_id"], r["category"], r["question_type"], r["question"], list(r["options"] or []),
                r["answer"], r["reasoning"], r["labels"], thumbs, answers.get(r["qa_id"], []),
            )
        )
    return samples


# ------------------------------------------------------------------------------------------------
# Stages and failures
# ------------------------------------------------------------------------------------------------
def collect_stages(workdir: Workdir, manifests: dict[str, dict[str, Any] | None]) -> list[StageView]:
    views = []
    for status in workdir_status(workdir, STAGE_NAMES):
        kinds: dict[str, int] = {}
        shown: list[dict[str, Any]] = []
        path = workdir.path(status.stage, FAILURES_FILE)
        if manifests.get(status.stage) is not None and workdir.fs.exists(path):
            failures = read_table_file(workdir.fs, path, FAILURES)
            kinds = dict(sorted(Counter(failures["error_kind"].to_pylist()).items()))
            shown = failures.slice(0, FAILURES_SHOWN).select(["item_id", "error_kind", "message"]).to_pylist()
        views.append(StageView(status, manifests.get(status.stage), kinds, shown))
    return views


def collect(workdir: Workdir) -> ReportData:
    manifests = {name: read_manifest(workdir, name) for name in STAGE_NAMES}
    run = read_json(workdir.fs, workdir.path(RUNS_DIR, LATEST_RUN)) or {}
    eval_manifest = manifests.get("eval")
    eval_table: list[dict[str, str]] = []
    eval_paired: list[dict[str, str]] = []
    eval_notes: list[str] = []
    if eval_manifest is not None:
        summary = read_published(workdir, eval_manifest, EVAL_SUMMARY).to_pylist()
        eval_table = accuracy_table(summary)
        verdicts = read_published(workdir, eval_manifest, EVAL_ITEMS).select(["model", "num_frames", "qa_id", "correct"]).to_pylist()
        eval_paired = paired_comparisons(verdicts, list(dict.fromkeys(r["model"] for r in summary)))
        eval_notes = list(eval_manifest["config"].get("skipped", []))
    reports = sorted(
        p.rsplit("/", 1)[-1] for p in (workdir.fs.ls(workdir.path(REPORT_DIR), detail=False) if workdir.exists(REPORT_DIR) else [])
        if p.endswith(".md")
    )
    return ReportData(
        workdir=workdir.url, run=run, stages=collect_stages(workdir, manifests), eval_table=eval_table, eval_paired=eval_paired,
        eval_notes=eval_notes,
        charts=ensure_charts(workdir, manifests), samples=collect_samples(workdir, manifests), stage_reports=reports,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def build_report(workdir_url: str | Workdir) -> str:
    """Write `<workdir>/report/index.html` (and its charts and thumbnails); returns its URI."""
    workdir = workdir_url if isinstance(workdir_url, Workdir) else Workdir(workdir_url)
    write_report_file(workdir, INDEX, render(collect(workdir)).encode())
    return workdir.uri(REPORT_DIR, INDEX)


def update_report(workdir_url: str | Workdir) -> str | None:
    """`build_report` for calling after every stage: a report that cannot be built is logged,
    never raised, so it can never fail the pipeline. Returns the report's URI, or None."""
    try:
        return build_report(workdir_url)
    except Exception:
        log.warning("report: could not update the run report of %s", workdir_url, exc_info=True)
        return None
