"""Versioned Arrow schemas of every artifact the DAG writes, and their validation.

A schema's version is bumped whenever a column is added, removed or changes type; manifests
record (name, version) so a reader can tell which layout it was given.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


class SchemaError(ValueError):
    """A table that does not match the schema a stage expects; the message names the column."""


@dataclass(frozen=True)
class TableSchema:
    name: str
    version: int
    schema: pa.Schema
    description: str = ""

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def empty(self) -> pa.Table:
        return self.schema.empty_table()

    def from_rows(self, rows: list[dict]) -> pa.Table:
        """Rows as dicts to a validated table; a missing or mistyped value fails here, not in a later stage."""
        missing = [c for c in self.columns if any(c not in r for r in rows)]
        if missing:
            raise SchemaError(f"{self.name}: rows lack column(s) {', '.join(sorted(set(missing)))}")
        try:
            table = pa.Table.from_pylist(rows, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SchemaError(f"{self.name}: {exc}") from exc
        return validate_table(table, self)


def _f(name: str, type_: pa.DataType, nullable: bool = False, doc: str = "", since: int | None = None) -> pa.Field:
    """A column; `since`: the schema version that added it (nullable), so files written before read it as null."""
    metadata = {"doc": doc} if doc else {}
    if since is not None:
        assert nullable, "a column added to existing files must be nullable"
        metadata["since"] = str(since)
    return pa.field(name, type_, nullable=nullable, metadata=metadata or None)


STRING = pa.string()
F64 = pa.float64()
I64 = pa.int64()
I32 = pa.int32()
BOOL = pa.bool_()

# Why an item failed, for deciding what to do about it: `input` (the video, clip or question itself
# is unusable: no retry helps), `output` (what a model or LLM produced for it was unusable: a retry
# may draw a usable one), `request` (the endpoint refused this request). Faults of the environment
# (an endpoint down, a full disk) are never rows: they fail the shard, which is redone.
FAILURE_CLASSES = ("input", "output", "request")
INPUT_FAULT, OUTPUT_FAULT, REQUEST_FAULT = FAILURE_CLASSES

FAILURES = TableSchema(
    "failures",
    2,
    pa.schema(
        [
            _f("item_id", STRING, doc="The input item that failed (a source URI, a clip id, a qa id...)."),
            _f("stage", STRING),
            _f("error_kind", STRING, doc="A short machine-readable reason, e.g. corrupt, not_a_video, malformed_answer."),
            _f("message", STRING, doc="What went wrong, for a person."),
            _f("detail", pa.large_string(), nullable=True, doc="Raw material kept for debugging, e.g. an LLM's raw answer."),
            _f("failure_class", STRING, nullable=True, since=2, doc="input, output or request (FAILURE_CLASSES); null in older files."),
        ]
    ),
    "One row per input item a stage could not process.",
)

VIDEOS = TableSchema(
    "videos",
    1,
    pa.schema(
        [
            _f("video_id", STRING, doc="Derived from the file's bytes: stable across runs and paths."),
            _f("uri", STRING, doc="Where the source video was read from."),
            _f("size_bytes", I64),
            _f("duration_s", F64),
            _f("fps", F64),
            _f("width", I32),
            _f("height", I32),
            _f("rotation", I32),
            _f("video_codec", STRING),
            _f("pix_fmt", STRING),
            _f("has_audio", BOOL),
            _f("audio_codec", STRING, nullable=True),
            _f("container", STRING),
            _f("bit_rate", I64, nullable=True),
            _f("n_frames", I64, nullable=True),
            _f("n_keyframes", I32),
            _f("clip_mode", STRING, doc="copy or exact: the cut mode actually used for this video."),
            _f("max_snap_deviation_s", F64),
            _f("n_clips", I32),
        ]
    ),
    "One row per source video that was clipped.",
)

CLIPS = TableSchema(
    "clips",
    1,
    pa.schema(
        [
            _f("clip_id", STRING, doc="<video_id>-<index>: deterministic."),
            _f("video_id", STRING),
            _f("clip_index", I32),
            _f("clip_uri", STRING, doc="The written clip file."),
            _f("source_uri", STRING),
            _f("start_s", F64, doc="True start in the source timeline, measured from the written file."),
            _f("end_s", F64, doc="True end in the source timeline."),
            _f("duration_s", F64),
            _f("n_frames", I32, doc="Frames counted in the written file."),
            _f("mode", STRING),
            _f("fps", F64),
            _f("width", I32),
            _f("height", I32),
        ]
    ),
    "One row per written clip.",
)

CAPTIONS = TableSchema(
    "captions",
    1,
    pa.schema(
        [
            _f("clip_id", STRING),
            _f("video_id", STRING),
            _f("start_s", F64),
            _f("end_s", F64),
            _f("caption", pa.large_string()),
            _f("model", STRING),
            _f("backend", STRING),
            _f("prompt_hash", STRING),
            _f("frames_used", I32),
            _f("tokens_in", I32),
            _f("tokens_out", I32),
            _f("latency_s", F64),
        ]
    ),
    "One caption per clip.",
)

QA = TableSchema(
    "qa",
    3,
    pa.schema(
        [
            _f("qa_id", STRING, doc="stable_hash(video_id, category, question_type, question): deterministic."),
            _f("video_id", STRING),
            _f("category", STRING, doc="Temporal, Goal and Purpose, Spatial, or Plot and Narrative."),
            _f("question_type", STRING, doc="multiple_choice or open_ended."),
            _f("question", pa.large_string()),
            _f("options", pa.list_(STRING), nullable=True, doc="Option texts in A-D order, without letters; null if open-ended."),
            _f("answer", pa.large_string(), doc="The option letter (A-D) for multiple_choice, the answer text for open_ended."),
            _f("reasoning", pa.large_string(), doc="The generator's raw reasoning."),
            _f("refined_reasoning", pa.large_string(), doc="Concise steps about the video (never about captions)."),
            _f("target", pa.large_string(), doc="<think>{refined_reasoning}</think><answer>{answer}</answer> training target."),
            _f("generator_model", STRING),
            _f("refiner_model", STRING),
            _f("prompt_version", STRING, doc="<version>-<hash of the template files used>, or the template backend's version."),
            _f("refine_prompt_version", STRING),
            _f("prompt_tokens", I32, nullable=True, doc="Usage of the generation request that wrote the item; null if not reported."),
            _f("completion_tokens", I32, nullable=True, doc="Reasoning tokens included, as the API counts them."),
            _f("reasoning_tokens", I32, nullable=True),
            _f("refine_prompt_tokens", I32, nullable=True),
            _f("refine_completion_tokens", I32, nullable=True),
            _f("refine_reasoning_tokens", I32, nullable=True),
            _f("generation_key", STRING, nullable=True, doc="Cache key of the generation answer (qa/_llm_cache/generate/); null for the template backend."),
            _f("refine_key", STRING, nullable=True, doc="Cache key of the refinement answer (qa/_llm_cache/refine/)."),
            _f("window_index", I32, nullable=True, since=3,
               doc="The context window of the video the question was asked about (qa.context_tokens), from 0; a video "
               "that fits one prompt is window 0. Null in older files."),
            _f("window_start_s", F64, nullable=True, since=3, doc="Start of the window's first clip; null in older files."),
            _f("window_end_s", F64, nullable=True, since=3, doc="End of the window's last clip; null in older files."),
        ]
    ),
    "Question-reasoning-answer items, one per row.",
)

FILTER_ROLLOUTS = TableSchema(
    "filter_rollouts",
    2,
    pa.schema(
        [
            _f("qa_id", STRING),
            _f("run", I32, doc="0 .. filter.runs-1: the sample's index within its question's batched generation."),
            _f("response", pa.large_string(), doc="What the base model wrote."),
            _f("predicted", pa.large_string(), nullable=True, doc="The option letter or answer text read from the response; null if none."),
            _f("correct", BOOL),
            _f("format_ok", BOOL, doc="The response is exactly <think>...</think><answer>...</answer> (tasks.grading.answers.format_reward)."),
            _f("grader", STRING, doc="choice (letter match), match (normalised text) or judge (the LLM judge decided)."),
            _f("tokens_out", I32),
            _f("finished", BOOL, doc="Ended with EOS rather than at max_new_tokens."),
            _f("model", STRING),
        ]
    ),
    "Every base-model answer drawn while filtering (filter/_rollouts/).",
)

# Values of FILTER's `difficulty` and `split` columns.
DIFFICULTIES = ("easy", "medium", "hard")
SFT_SPLIT, RL_SPLIT, EVAL_SPLIT, UNUSED_SPLIT = "sft", "rl", "eval", "unused"
SPLITS = (SFT_SPLIT, RL_SPLIT, EVAL_SPLIT, UNUSED_SPLIT)

FILTER = TableSchema(
    "filter",
    2,
    pa.schema(
        [
            _f("qa_id", STRING),
            _f("video_id", STRING),
            _f("video_uri", STRING, doc="The source video (clip/_videos uri): what SFT, GRPO and eval sample frames from."),
            _f("category", STRING),
            _f("question_type", STRING, doc="multiple_choice or open_ended."),
            _f("question", pa.large_string()),
            _f("options", pa.list_(STRING), nullable=True, doc="Option texts in A-D order; null if open-ended."),
            _f("answer", pa.large_string(), doc="The option letter, or the answer text."),
            _f("prompt", pa.large_string(), doc="The user turn's text after the video (tasks.grading.prompts.user_prompt)."),
            _f("target", pa.large_string(), doc="<think>reasoning</think><answer>answer</answer>: the SFT target (from qa)."),
            _f("n_runs", I32),
            _f("n_correct", I32),
            _f("n_format_ok", I32),
            _f("pass_rate", F64, doc="n_correct / n_runs."),
            _f("difficulty", STRING, doc="easy, medium or hard (filter.easy_min_pass_rate / hard_max_pass_rate)."),
            _f("reasoning_words", I32, doc="Words in the target's reasoning."),
            _f("quality", F64, doc="SFT quality of the target's reasoning, 0 (not eligible) to 1 (tasks/filter/labels.py)."),
            _f("split", STRING, doc="sft, rl, eval or unused."),
            _f("model", STRING, doc="The base model that answered."),
            _f("num_frames", I32, doc="Frames the base model saw."),
        ]
    ),
    "Difficulty labels and split per qa item, with everything SFT, GRPO and eval need to train on it.",
)

TRAIN_METRICS = TableSchema(
    "train_metrics",
    1,
    pa.schema(
        [
            _f("stage", STRING),
            _f("step", I64),
            _f("name", STRING),
            _f("value", F64),
            _f("time_s", F64),
        ]
    ),
    "Long-format training metrics (one row per step and metric) for sft and grpo.",
)

GRPO_SAMPLES = TableSchema(
    "grpo_samples",
    1,
    pa.schema(
        [
            _f("step", I64, doc="The GRPO step (1-based) whose rollouts these are: every tracking.samples_every steps."),
            _f("qa_id", STRING),
            _f("sample", I32, doc="0 .. group_size-1: the rollout's index within its question's group."),
            _f("prompt", pa.large_string(), doc="The user turn's text after the video."),
            _f("response", pa.large_string(), doc="The rollout as decoded (what the rewards read)."),
            _f("reward", F64, doc="accuracy_weight * accuracy + format_weight * format."),
            _f("accuracy_reward", F64),
            _f("format_reward", F64),
            _f("advantage", F64, doc="The group-normalised advantage (Eq. 2)."),
            _f("kept", BOOL, doc="The group went into the update (false: dropped for zero reward variance)."),
        ]
    ),
    "Sampled GRPO rollouts of the first data-parallel replica (grpo/_samples/).",
)

EVAL_ITEMS = TableSchema(
    "eval_items",
    3,
    pa.schema(
        [
            _f("eval_id", STRING, doc="<model>::<num_frames, 5 digits>::<qa_id>: one model's answer to one item at one frame count."),
            _f("model", STRING, doc="The eval.models entry: base, sft, grpo, or a checkpoint path / model id."),
            _f("model_path", STRING, doc="What was loaded: the resolved checkpoint folder or model id."),
            _f("qa_id", STRING),
            _f("video_id", STRING),
            _f("category", STRING),
            _f("question_type", STRING, doc="multiple_choice or open_ended."),
            _f("num_frames", I32, doc="Frames asked for across the whole source video (the frames-sweep axis)."),
            _f("frames_used", I32, doc="Frames the model saw (read_frames rounds up to the temporal patch and caps at the video's frames)."),
            _f("samples", I32, doc="Answers drawn (1: greedy; more: sampled, then majority vote)."),
            _f("prediction", pa.large_string(), nullable=True, doc="The option letter or answer text read from the response (the majority's); null if none."),
            _f("correct", BOOL, doc="tasks.grading.answers' verdict on the prediction (the LLM judge's where it decided)."),
            _f(
                "grader", STRING, nullable=True, since=3,
                doc="How the verdict was reached: choice (letter match), match (normalised text) or judge (the LLM judge decided).",
            ),
            _f("votes", I32, doc="Samples that gave the prediction."),
            _f("n_correct", I32, doc="Samples that were right (pass@k is n_correct > 0)."),
            _f("format_ok", BOOL, doc="The chosen response is exactly <think>...</think><answer>...</answer>."),
            _f("response", pa.large_string(), doc="The chosen response: the first sample that gave the prediction (else the first sample)."),
            _f("response_length", I32, doc="Tokens of the chosen response."),
            _f("finished", BOOL, doc="The chosen response ended with EOS rather than at eval.max_new_tokens."),
        ]
    ),
    "Per model, frame count and eval item: the model's answer and whether it was right.",
)

EVAL_SUMMARY = TableSchema(
    "eval_summary",
    1,
    pa.schema(
        [
            _f("model", STRING),
            _f("category", STRING, doc="A reasoning category, or Overall (every item of the model at that frame count)."),
            _f("num_frames", I32),
            _f("n", I32, doc="Items answered (items that failed, e.g. an unreadable video, are in eval/_failures.parquet)."),
            _f("correct", I32),
            _f("accuracy", F64, doc="correct / n."),
        ]
    ),
    "Accuracy per model, category and frame count (eval/_summary/).",
)

SCHEMAS: dict[str, TableSchema] = {
    s.name: s for s in (FAILURES, VIDEOS, CLIPS, CAPTIONS, QA, FILTER_ROLLOUTS, FILTER, TRAIN_METRICS, GRPO_SAMPLES, EVAL_ITEMS, EVAL_SUMMARY)
}


def get_schema(name: str) -> TableSchema:
    try:
        return SCHEMAS[name]
    except KeyError:
        raise SchemaError(f"no schema named {name!r}; known: {', '.join(SCHEMAS)}") from None


def _equivalent(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual.equals(expected):
        return True
    strings = (pa.string(), pa.large_string())
    if actual in strings and expected in strings:
        return True
    if pa.types.is_integer(expected) and pa.types.is_integer(actual):
        return True  # width differences are cast (safely: an overflow is still an error)
    if pa.types.is_floating(expected) and (pa.types.is_floating(actual) or pa.types.is_integer(actual)):
        return True
    if pa.types.is_null(actual):
        return True  # an all-null column written without type information
    if (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and pa.types.is_list(expected):
        return _equivalent(actual.value_type, expected.value_type)
    return False


def validate_table(table: pa.Table, schema: TableSchema) -> pa.Table:
    """Check columns and types; return the table cast to the canonical schema (column order included)."""
    present = set(table.column_names)
    for field in schema.schema:
        if field.name not in present and field.metadata and b"since" in field.metadata:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))  # written before the column existed
            continue
        if field.name not in present:
            raise SchemaError(f"{schema.name} v{schema.version}: column {field.name!r} ({field.type}) is missing")
        actual = table.schema.field(field.name).type
        if not _equivalent(actual, field.type):
            raise SchemaError(
                f"{schema.name} v{schema.version}: column {field.name!r} has type {actual}, expected {field.type}"
            )
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"{schema.name} v{schema.version}: column {field.name!r} has nulls but is not nullable")
    extra = present - set(schema.columns)
    if extra:
        raise SchemaError(f"{schema.name} v{schema.version}: unexpected column(s) {', '.join(sorted(extra))}")
    try:
        return table.select(schema.columns).cast(schema.schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaError(f"{schema.name} v{schema.version}: {exc}") from exc
