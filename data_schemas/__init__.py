"""Arrow schemas of every artifact, validated on write and on read."""

from data_schemas.schemas import (
    CAPTIONS,
    CLIPS,
    DIFFICULTIES,
    EVAL_ITEMS,
    EVAL_SPLIT,
    EVAL_SUMMARY,
    FAILURE_CLASSES,
    FAILURES,
    FILTER,
    FILTER_ROLLOUTS,
    GRPO_SAMPLES,
    INPUT_FAULT,
    OUTPUT_FAULT,
    QA,
    REQUEST_FAULT,
    RL_SPLIT,
    SCHEMAS,
    SFT_SPLIT,
    SPLITS,
    TRAIN_METRICS,
    UNUSED_SPLIT,
    VIDEOS,
    SchemaError,
    TableSchema,
    get_schema,
    validate_table,
)

__all__ = [
    "CAPTIONS", "CLIPS", "DIFFICULTIES", "EVAL_SPLIT", "FAILURE_CLASSES", "INPUT_FAULT", "OUTPUT_FAULT", "REQUEST_FAULT", "RL_SPLIT", "SFT_SPLIT", "SPLITS", "UNUSED_SPLIT", "EVAL_ITEMS", "EVAL_SUMMARY", "FAILURES", "FILTER", "FILTER_ROLLOUTS", "GRPO_SAMPLES", "QA", "SCHEMAS",
    "TRAIN_METRICS", "VIDEOS", "SchemaError", "TableSchema", "get_schema", "validate_table",
]
