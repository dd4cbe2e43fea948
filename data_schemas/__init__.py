"""Arrow schemas of every artifact, validated on write and on read."""

from data_schemas.schemas import (
    CAPTIONS,
    CLIPS,
    EVAL_ITEMS,
    EVAL_SUMMARY,
    FAILURES,
    FILTER,
    FILTER_ROLLOUTS,
    QA,
    SCHEMAS,
    TRAIN_METRICS,
    VIDEOS,
    SchemaError,
    TableSchema,
    get_schema,
    validate_table,
)

__all__ = [
    "CAPTIONS", "CLIPS", "EVAL_ITEMS", "EVAL_SUMMARY", "FAILURES", "FILTER", "FILTER_ROLLOUTS", "QA", "SCHEMAS",
    "TRAIN_METRICS", "VIDEOS", "SchemaError", "TableSchema", "get_schema", "validate_table",
]
