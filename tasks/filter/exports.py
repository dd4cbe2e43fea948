"""Dataset exports of the filter stage's splits, in the layouts trainers read.

Under `<workdir>/filter/_exports/` (the `_` keeps them out of `pandas.read_parquet("<workdir>/filter")`),
one file per split (sft, rl, eval). A split with no items still gets its file, with no rows (pandas
and pyarrow read it; `datasets` refuses to build an empty split, but globbing it with others works):

- `messages/<split>.parquet`: the chat `messages` format of TRL / transformers chat templates,
  loadable with `datasets.load_dataset("parquet", data_files=...)`. The user turn holds the video
  (`{"type": "video", "video": <uri>}`) and the prompt text; the assistant turn the
  `<think>...</think><answer>...</answer>` target. `videos` lists the video too, for trainers that
  take media beside the messages.
- `llava/<split>.json`: LLaVA / VILA conversations, `{"id", "video", "conversations": [{"from":
  "human", "value": "<video>\\n<prompt>"}, {"from": "gpt", "value": <target>}]}`.
- `easyr1/<split>.parquet`: the Long-RL / EasyR1 layout: `problem` ("<video>" then the question,
  its options and answer rule), `videos` (one path), `answer` (`<answer>X</answer>`),
  `problem_type` ("multiple choice" or "free-form", the Video-R1 vocabulary EasyR1-style reward
  functions switch on). `easyr1/format_prompt.jinja` adds the format rule: EasyR1 given
  `data.format_prompt=<it>` renders exactly the prompt used here (`tasks.grading.prompts`).

Every record also carries `qa_id`, `category`, `question_type`, `difficulty` and `pass_rate`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.engine.store import write_bytes_atomic
from tasks.grading.prompts import (
    FORMAT_RULE,
    MULTIPLE_CHOICE,
    answer_tag,
    question_with_rule,
)

EXPORTS_DIR = "_exports"
EXPORT_SPLITS = ("sft", "rl", "eval")  # the `split` values of filter/ worth a file; "unused" is not
VIDEO_PLACEHOLDER = "<video>"
PROBLEM_TYPES = {MULTIPLE_CHOICE: "multiple choice", "open_ended": "free-form"}
EASYR1_FORMAT_PROMPT = "{{ content | trim }}\n" + FORMAT_RULE + "\n"

_META = [
    pa.field("qa_id", pa.string()),
    pa.field("category", pa.string()),
    pa.field("question_type", pa.string()),
    pa.field("difficulty", pa.string()),
    pa.field("pass_rate", pa.float64()),
]
_PART = pa.struct([pa.field("type", pa.string()), pa.field("text", pa.large_string()), pa.field("video", pa.string())])
MESSAGES_SCHEMA = pa.schema(
    [
        pa.field("messages", pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.list_(_PART))]))),
        pa.field("videos", pa.list_(pa.string())),
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


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    return {f.name: row[f.name] for f in _META}


def messages_record(row: dict[str, Any]) -> dict[str, Any]:
    user = [{"type": "video", "text": None, "video": row["video_uri"]}, {"type": "text", "text": row["prompt"], "video": None}]
    assistant = [{"type": "text", "text": row["target"], "video": None}]
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], "videos": [row["video_uri"]], **_meta(row)}


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


def easyr1_record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "problem": VIDEO_PLACEHOLDER + question_with_rule(row["question"], row["question_type"], row["options"]),
        "answer": answer_tag(row["answer"]),
        "videos": [row["video_uri"]],
        "problem_type": PROBLEM_TYPES[row["question_type"]],
        **_meta(row),
    }


def _parquet_bytes(records: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema, compression="zstd") as writer:
        # No records, no row group: an empty row group breaks `datasets`' Parquet reader even when
        # the file is globbed together with others; a file without any contributes nothing.
        if records:
            writer.write_table(pa.Table.from_pylist(records, schema=schema))
    return buf.getvalue()


def write_exports(fs: fsspec.AbstractFileSystem, directory: str, rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Write every format for every exported split; returns format -> split -> path."""
    written: dict[str, dict[str, str]] = {"messages": {}, "llava": {}, "easyr1": {}}
    for split in EXPORT_SPLITS:
        members = sorted((r for r in rows if r["split"] == split), key=lambda r: r["qa_id"])
        files = {
            "messages": (f"messages/{split}.parquet", _parquet_bytes([messages_record(r) for r in members], MESSAGES_SCHEMA)),
            "llava": (f"llava/{split}.json", json.dumps([llava_record(r) for r in members], ensure_ascii=False, indent=1).encode()),
            "easyr1": (f"easyr1/{split}.parquet", _parquet_bytes([easyr1_record(r) for r in members], EASYR1_SCHEMA)),
        }
        for fmt, (name, data) in files.items():
            path = f"{directory}/{name}"
            write_bytes_atomic(fs, path, data)
            written[fmt][split] = path
    write_bytes_atomic(fs, f"{directory}/easyr1/format_prompt.jinja", EASYR1_FORMAT_PROMPT.encode())
    return written
