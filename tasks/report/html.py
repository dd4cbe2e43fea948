"""Rendering the run report: plain data in, one self-contained HTML page out (no scripts, inline
CSS, images as data URIs). Every text from the workdir is escaped: questions and model answers are
arbitrary text."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from tasks.engine.runs import StageStatus
from tasks.grading.prompts import LETTERS

STATUS_COLORS = {
    "done": "#2e7d32", "cached": "#1565c0", "failed": "#c62828",
    "incomplete": "#ef6c00", "missing": "#757575",
}
CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #212121; background: #fff; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
.meta { color: #555; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { color: #fff; border-radius: 3px; padding: 1px 6px; font-size: 12px; white-space: nowrap; }
.chart { display: inline-block; margin: 8px 16px 8px 0; vertical-align: top; }
.chart img { max-width: 560px; border: 1px solid #eee; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 8px 16px; margin: 12px 0; }
.thumbs { display: flex; flex-wrap: wrap; gap: 6px; }
.thumbs figure { margin: 0; width: 150px; }
.thumbs img { height: 108px; max-width: 150px; border: 1px solid #ccc; }
.thumbs figcaption { font-size: 12px; }
.reasoning { background: #fafafa; border-left: 3px solid #90caf9; padding: 6px 10px; white-space: pre-wrap; font-size: 13px; }
.right { color: #2e7d32; font-weight: bold; } .wrong { color: #c62828; font-weight: bold; }
.muted { color: #757575; }
"""


@dataclass(frozen=True)
class StageView:
    status: StageStatus
    manifest: dict[str, Any] | None
    failure_kinds: dict[str, int] = field(default_factory=dict)
    failures_shown: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ChartView:
    file: str
    title: str
    stage: str
    png: bytes


@dataclass(frozen=True)
class AnswerView:
    model: str
    num_frames: int
    prediction: str | None
    correct: bool
    response: str


@dataclass(frozen=True)
class Thumbnail:
    """A frame of one clip, with what the caption stage said the clip shows."""

    image: bytes
    span: str  # MM:SS-MM:SS of the clip in its video
    caption: str | None  # None before the caption stage has run


@dataclass(frozen=True)
class SampleView:
    qa_id: str
    video_id: str
    category: str
    question_type: str
    question: str
    options: list[str]
    answer: str
    reasoning: str
    labels: list[str]
    thumbnails: list[Thumbnail]
    answers: list[AnswerView]


@dataclass(frozen=True)
class ReportData:
    workdir: str
    run: dict[str, Any]
    stages: list[StageView]
    eval_table: list[dict[str, str]]
    eval_paired: list[dict[str, str]]  # tasks.report.accuracy.paired_comparisons
    eval_notes: list[str]
    charts: list[ChartView]
    samples: list[SampleView]
    stage_reports: list[str]
    built_at: str


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _text(value: Any, limit: int | None = None) -> str:
    text = "" if value is None else str(value)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return escape(text)


def _num(value: Any, spec: str = "") -> str:
    return "" if value is None else escape(format(value, spec))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """Cells must already be HTML (escaped by the caller)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _status(status: str) -> str:
    return f'<span class="status" style="background:{STATUS_COLORS.get(status, "#757575")}">{escape(status)}</span>'


def _reuse(view: StageView) -> str:
    """What the stage did not have to recompute: the whole stage, or items and shards."""
    m = view.manifest
    if view.status.status == "cached":
        return "whole stage (fingerprint matched)"
    if not m:
        return ""
    items, computed = m.get("items"), m.get("items_computed")
    shards = m.get("shards", {})
    parts = []
    if items is not None and computed is not None:
        parts.append(f"{items - computed}/{items} items")
    if shards.get("total"):
        parts.append(f"{shards.get('reused', 0)}/{shards['total']} shards")
    return escape(", ".join(parts))


def _stages_section(stages: Sequence[StageView]) -> str:
    rows = [
        [
            f"<b>{escape(v.status.stage)}</b>", _status(v.status.status), _num(v.status.rows), _num(v.status.failures),
            _reuse(v), _num(v.status.work_time_s, ".2f"), _num(v.status.wall_time_s, ".2f"), _text(v.status.finished_at),
            _text(v.status.message, 400),
        ]
        for v in stages
    ]
    headers = ["stage", "status", "rows", "failures", "reused (cache hits)", "work s", "wall s", "finished", "note"]
    return "<h2 id='stages'>Stages</h2>" + _table(headers, rows, numeric=(2, 3, 5, 6))


def _failures_section(stages: Sequence[StageView]) -> str:
    parts = ["<h2 id='failures'>Failures</h2>"]
    failing = [v for v in stages if v.failure_kinds]
    if not failing:
        parts.append("<p>No failures.</p>")
    for v in failing:
        total = sum(v.failure_kinds.values())
        kinds = ", ".join(f"{escape(k)}: {n}" for k, n in v.failure_kinds.items())
        parts.append(f"<h3>{escape(v.status.stage)}: {total} failure{'s' if total != 1 else ''} ({kinds})</h3>")
        rows = [[_text(f["item_id"], 160), _text(f["error_kind"]), _text(f["message"], 400)] for f in v.failures_shown]
        parts.append(_table(["item", "reason", "message"], rows))
        if total > len(v.failures_shown):
            parts.append(f"<p class='muted'>{total - len(v.failures_shown)} more in {escape(v.status.stage)}/_failures.parquet</p>")
    return "".join(parts)


def _eval_section(table: Sequence[dict[str, str]], paired: Sequence[dict[str, str]], notes: Sequence[str]) -> str:
    parts = ["<h2 id='eval'>Evaluation</h2>"]
    if not table:
        parts.append("<p class='muted'>The eval stage has not run yet.</p>")
    for rows in (table, paired):
        if rows:
            columns = list(dict.fromkeys(k for row in rows for k in row))
            parts.append(_table(columns, [[_text(row.get(c, "-")) for c in columns] for row in rows]))
    parts += [f"<p class='muted'>{_text(note)}</p>" for note in notes]
    return "".join(parts)


def _charts_section(charts: Sequence[ChartView]) -> str:
    if not charts:
        return "<h2 id='charts'>Charts</h2><p class='muted'>No stage with charts has finished yet.</p>"
    figures = "".join(
        f"<figure class='chart'><img alt='{escape(c.title)}' src='{data_uri(c.png, 'image/png')}'>"
        f"<figcaption>{escape(c.title)} <span class='muted'>({escape(c.file)})</span></figcaption></figure>"
        for c in charts
    )
    return f"<h2 id='charts'>Charts</h2>{figures}"


def _sample(s: SampleView) -> str:
    thumbs = "".join(
        f"<figure><img alt='clip of {escape(s.video_id)}' src='{data_uri(t.image, 'image/jpeg')}'>"
        f"<figcaption><b>{escape(t.span)}</b>{'' if t.caption is None else ' ' + _text(t.caption, 160)}</figcaption></figure>"
        for t in s.thumbnails
    )
    options = "".join(f"<li>{LETTERS[i]}. {_text(o)}</li>" for i, o in enumerate(s.options))
    answers = ""
    if s.answers:
        rows = [
            [
                _text(a.model), _num(a.num_frames), _text(a.prediction if a.prediction is not None else "(none)", 120),
                "<span class='right'>right</span>" if a.correct else "<span class='wrong'>wrong</span>", _text(a.response, 400),
            ]
            for a in s.answers
        ]
        answers = _table(["model", "frames", "prediction", "verdict", "response"], rows)
    labels = " · ".join(escape(x) for x in [s.question_type, *s.labels])
    return (
        f"<div class='sample'><h3>{escape(s.category)}: <span class='muted'>{escape(s.qa_id)}</span></h3>"
        f"<p class='muted'>{labels} · video {escape(s.video_id)}</p>"
        f"<div class='thumbs'>{thumbs or '<span class=muted>no clip thumbnails</span>'}</div>"
        f"<p><b>Question:</b> {_text(s.question)}</p>{f'<ol style=list-style:none>{options}</ol>' if options else ''}"
        f"<p><b>Answer:</b> {_text(s.answer)}</p><div class='reasoning'><b>Reasoning:</b> {_text(s.reasoning, 2000)}</div>{answers}</div>"
    )


def _samples_section(samples: Sequence[SampleView]) -> str:
    if not samples:
        return "<h2 id='samples'>Sample questions</h2><p class='muted'>No questions yet (the qa stage has not run).</p>"
    return "<h2 id='samples'>Sample questions</h2>" + "".join(_sample(s) for s in samples)


def render(data: ReportData) -> str:
    run = data.run
    run_line = (
        f"run <code>{_text(run.get('run_id'))}</code> {_status(run.get('status', 'unknown'))} started {_text(run.get('started_at'))}, "
        f"finished {_text(run.get('finished_at') or '-')}"
        if run else "no pipeline run recorded"
    )
    reports = " · ".join(f"<a href='{escape(name)}'>{escape(name)}</a>" for name in data.stage_reports)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>lvr run report</title>"
        f"<style>{CSS}</style></head><body>"
        f"<h1>lvr run report</h1><p class='meta'>workdir <code>{_text(data.workdir)}</code> · {run_line} · built {_text(data.built_at)}</p>"
        + _stages_section(data.stages)
        + _failures_section(data.stages)
        + _eval_section(data.eval_table, data.eval_paired, data.eval_notes)
        + _charts_section(data.charts)
        + _samples_section(data.samples)
        + (f"<p class='meta'>Stage reports: {reports}</p>" if reports else "")
        + "</body></html>\n"
    )
