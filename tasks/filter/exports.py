"""Dataset exports of the filter stage's splits, each in the layout its consumer reads as it is.

Under `<workdir>/filter/_exports/` (the `_` keeps them out of `pandas.read_parquet("<workdir>/filter")`).
Every split gets its file, with no rows when it has no items: the other splits of a folder still
load (`datasets.load_dataset("parquet", data_dir=...)`); only asking for the empty one fails.

- `longvideo-reason/{train,validation,test}.parquet`: the LongVideo-Reason layout that Long-RL
  (NVlabs) trains and evaluates on. `problem` is the question, its options and the answer rule,
  without a video placeholder (Long-RL wraps it in its own question template); `reasoning` the
  `<think>` text; `answer` the bare answer (option letter or answer text: the reward compares the
  model's answer with it through `mathruler`'s `grade_answer`, which fails on a tagged one);
  `videos` ONE path, relative to the manifest's `video_dir`. `train` is the RL split (Long-RL is
  an RL trainer: SFT items, too easy or too hard, give GRPO groups without signal); `validation`
  and `test` are both the eval split: Long-RL validates on `<dir>@validation` during training and
  its benchmark script reads `<dir>@test`. Run it with `data.train_files=<dir>@train
  data.val_files=<dir>@validation data.video_dir=<video_dir>`.
- `easyr1/{train,validation,test}.parquet`: EasyR1's layout, same splits. `problem` starts with
  `<video>` (EasyR1 puts the video where the placeholder is), `videos` is a list of one path
  relative to `video_dir` (EasyR1 joins video paths with `data.image_dir`), `answer` is bare.
  `easyr1_format_prompt.jinja` (beside the folder: EasyR1 takes a folder's file type from its
  first entry, so it must hold data files only) adds the format rule: with
  `data.format_prompt=<it>` EasyR1 renders exactly the prompt used here (`tasks.grading.prompts`).
  Both Parquet layouts also hold `problem_type` ("multiple choice" or "free-form", the Video-R1
  vocabulary that video reward functions switch on).
- `trl/{sft,rl,eval}.parquet`: TRL's conversational layouts: `messages` (the user turn holds the
  video part `{"type": "video", "video": <uri>}` and the prompt text, the assistant turn the
  `<think>...</think><answer>...</answer>` target), the same turns as `prompt` / `completion` (for
  completion-only loss), and `videos` (the video's URI). Each message is stored as JSON (Arrow's
  `arrow.json`, which `datasets` reads back as its `Json` feature), so a content part holds its
  own keys only: as Arrow structs every text part would carry `video: null`, and Qwen-VL chat
  templates take any part with a `video` key for a video.
- `llava/{sft,rl,eval}.json`: LLaVA / VILA conversations, `{"id", "video", "conversations": [{"from":
  "human", "value": "<video>\\n<prompt>"}, {"from": "gpt", "value": <target>}]}`.
- `manifest.json`: `video_dir` (the deepest folder holding every exported video; null when they
  share none, and then the relative layouts hold whole URIs), each format's file per split, and
  which filter split each file holds.

Every record also carries `qa_id`, `category`, `question_type`, `difficulty` and `pass_rate`.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.engine.store import write_bytes_atomic
from tasks.filter.labels import EVAL, RL, SFT, reasoning_text
from tasks.grading.prompts import (
    FORMAT_RULE,
    MULTIPLE_CHOICE,
    OPEN_ENDED,
    question_with_rule,
)

EXPORTS_DIR = "_exports"
EXPORT_SPLITS = (SFT, RL, EVAL)  # the `split` values of filter/ worth a file; "unused" is not
MANIFEST_FILE = "manifest.json"
VIDEO_PLACEHOLDER = "<video>"
PROBLEM_TYPES = {MULTIPLE_CHOICE: "multiple choice", OPEN_ENDED: "free-form"}
EASYR1_FORMAT_PROMPT = "{{ content | trim }}\n" + FORMAT_RULE + "\n"
EASYR1_FORMAT_PROMPT_FILE = "easyr1_format_prompt.jinja"
# The files of the RL trainers (Long-RL, EasyR1), named as the splits `datasets` infers from file
# names, and the filter split each holds.
RL_TRAINER_SPLITS = {"train": RL, "validation": EVAL, "test": EVAL}

_META = [
    pa.field("qa_id", pa.string()),
    pa.field("category", pa.string()),
    pa.field("question_type", pa.string()),
    pa.field("difficulty", pa.string()),
    pa.field("pass_rate", pa.float64()),
]
LONGVIDEO_REASON_SCHEMA = pa.schema(
    [
        pa.field("problem", pa.large_string()),
        pa.field("reasoning", pa.large_string()),
        pa.field("answer", pa.large_string()),
        pa.field("videos", pa.string()),
        pa.field("problem_type", pa.string()),
        *_META,
    ]
)
EASYR1_SCHEMA = pa.schema(
    [
        pa.field("problem", pa.large_string()),
        pa.field("answer", pa.large_string()),
        pa.field("videos", pa.list_(pa.string())),
        pa.field("problem_type", pa.string()),
        *_META,
    ]
)
_JSON_LIST = pa.list_(pa.json_())
TRL_SCHEMA = pa.schema(
    [
        pa.field("messages", _JSON_LIST),
        pa.field("prompt", _JSON_LIST),
        pa.field("completion", _JSON_LIST),
        pa.field("videos", pa.list_(pa.string())),
        *_META,
    ]
)
_JSON_COLUMNS = ("messages", "prompt", "completion")


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    return {f.name: row[f.name] for f in _META}


def common_video_dir(uris: Sequence[str]) -> str | None:
    """The deepest folder (path or URI) holding every video, or None when they share none."""
    schemes = {u.split("://", 1)[0] if "://" in u else "" for u in uris}
    if not uris or len(schemes) != 1:
        return None
    scheme = schemes.pop()
    parents = [posixpath.dirname(u.split("://", 1)[1] if scheme else u) for u in uris]
    try:
        common = posixpath.commonpath(parents)
    except ValueError:  # absolute and relative paths mixed
        return None
    if not common:
        return None
    return f"{scheme}://{common}" if scheme else common


def relative_video(uri: str, video_dir: str | None) -> str:
    """The video's path under `video_dir` (the whole URI when there is none)."""
    return uri if video_dir is None else posixpath.relpath(uri, video_dir)


def longvideo_reason_record(row: dict[str, Any], video_dir: str | None) -> dict[str, Any]:
    return {
        "problem": question_with_rule(row["question"], row["question_type"], row["options"]),
        "reasoning": reasoning_text(row["target"]),
        "answer": row["answer"].strip(),
        "videos": relative_video(row["video_uri"], video_dir),
        "problem_type": PROBLEM_TYPES[row["question_type"]],
        **_meta(row),
    }


def easyr1_record(row: dict[str, Any], video_dir: str | None) -> dict[str, Any]:
    return {
        "problem": VIDEO_PLACEHOLDER + question_with_rule(row["question"], row["question_type"], row["options"]),
        "answer": row["answer"].strip(),
        "videos": [relative_video(row["video_uri"], video_dir)],
        "problem_type": PROBLEM_TYPES[row["question_type"]],
        **_meta(row),
    }


def trl_record(row: dict[str, Any]) -> dict[str, Any]:
    user = {"role": "user", "content": [{"type": "video", "video": row["video_uri"]}, {"type": "text", "text": row["prompt"]}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": row["target"]}]}
    return {"messages": [user, assistant], "prompt": [user], "completion": [assistant], "videos": [row["video_uri"]], **_meta(row)}


def llava_record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["qa_id"],
        "video": row["video_uri"],
        "conversations": [
            {"from": "human", "value": f"{VIDEO_PLACEHOLDER}\n{row['prompt']}"},
            {"from": "gpt", "value": row["target"]},
        ],
        **_meta(row),
    }


def _json_list(values: list[list[dict[str, Any]]]) -> pa.Array:
    """Lists of dicts as `list<arrow.json>`: each dict keeps exactly its own keys."""
    storage = pa.array([[json.dumps(v, ensure_ascii=False) for v in vs] for vs in values], pa.list_(pa.string()))
    return pa.ListArray.from_arrays(storage.offsets, pa.ExtensionArray.from_storage(pa.json_(), storage.values))


def _table(records: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    columns = [
        _json_list([r[f.name] for r in records]) if f.name in _JSON_COLUMNS else pa.array([r[f.name] for r in records], f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _parquet_bytes(records: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema, compression="zstd") as writer:
        # No records, no row group: an empty row group breaks `datasets`' Parquet reader even when
        # the file is globbed together with others; a file without any contributes nothing.
        if records:
            writer.write_table(_table(records, schema))
    return buf.getvalue()


def _json_bytes(records: list[dict[str, Any]]) -> bytes:
    return json.dumps(records, ensure_ascii=False, indent=1).encode()


def write_exports(fs: fsspec.AbstractFileSystem, directory: str, rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Write every format for every exported split and the manifest; returns format -> file split -> path."""
    by_split = {s: sorted((r for r in rows if r["split"] == s), key=lambda r: r["qa_id"]) for s in EXPORT_SPLITS}
    video_dir = common_video_dir(sorted({r["video_uri"] for members in by_split.values() for r in members}))
    formats: dict[str, tuple[str, dict[str, str], Callable[[list[dict[str, Any]]], bytes]]] = {
        "longvideo-reason": (
            "parquet",
            RL_TRAINER_SPLITS,
            lambda rs: _parquet_bytes([longvideo_reason_record(r, video_dir) for r in rs], LONGVIDEO_REASON_SCHEMA),
        ),
        "easyr1": ("parquet", RL_TRAINER_SPLITS, lambda rs: _parquet_bytes([easyr1_record(r, video_dir) for r in rs], EASYR1_SCHEMA)),
        "trl": ("parquet", {s: s for s in EXPORT_SPLITS}, lambda rs: _parquet_bytes([trl_record(r) for r in rs], TRL_SCHEMA)),
        "llava": ("json", {s: s for s in EXPORT_SPLITS}, lambda rs: _json_bytes([llava_record(r) for r in rs])),
    }
    written: dict[str, dict[str, str]] = {}
    for fmt, (ext, splits, encode) in formats.items():
        written[fmt] = {}
        for name, split in splits.items():
            path = f"{directory}/{fmt}/{name}.{ext}"
            write_bytes_atomic(fs, path, encode(by_split[split]))
            written[fmt][name] = path
    write_bytes_atomic(fs, f"{directory}/{EASYR1_FORMAT_PROMPT_FILE}", EASYR1_FORMAT_PROMPT.encode())
    manifest = {
        "video_dir": video_dir,
        "files": {fmt: {name: f"{fmt}/{name}.{ext}" for name in splits} for fmt, (ext, splits, _) in formats.items()},
        "filter_splits": {fmt: dict(splits) for fmt, (_, splits, _) in formats.items()},
        "easyr1_format_prompt": EASYR1_FORMAT_PROMPT_FILE,
    }
    write_bytes_atomic(fs, f"{directory}/{MANIFEST_FILE}", json.dumps(manifest, indent=1).encode())
    return written
