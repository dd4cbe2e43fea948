import pyarrow as pa
import pytest

from data_schemas import CLIPS, FAILURES, SCHEMAS, SchemaError, validate_table


def _clip_row(**over):
    row = {
        "clip_id": "v-00000", "video_id": "v", "clip_index": 0, "clip_uri": "/x.mp4", "source_uri": "/s.mp4",
        "start_s": 0.0, "end_s": 10.0, "duration_s": 10.0, "n_frames": 250, "mode": "copy", "fps": 25.0,
        "width": 160, "height": 120,
    }
    row.update(over)
    return row


def test_every_artifact_has_a_versioned_schema():
    for name in ("videos", "clips", "captions", "qa", "filter_rollouts", "filter", "train_metrics", "failures", "eval_items"):
        assert SCHEMAS[name].version >= 1 and len(SCHEMAS[name].columns) >= 4


def test_from_rows_round_trip():
    table = CLIPS.from_rows([_clip_row()])
    assert table.schema.equals(CLIPS.schema) and table.num_rows == 1


def test_wrong_type_names_column_and_expected_type():
    table = pa.Table.from_pylist([_clip_row(start_s="zero")])
    with pytest.raises(SchemaError, match=r"column 'start_s' has type string, expected double"):
        validate_table(table, CLIPS)


def test_missing_and_extra_columns():
    row = _clip_row()
    del row["n_frames"]
    with pytest.raises(SchemaError, match=r"column 'n_frames' \(int32\) is missing"):
        validate_table(pa.Table.from_pylist([row]), CLIPS)
    with pytest.raises(SchemaError, match=r"unexpected column\(s\) extra$"):
        validate_table(pa.Table.from_pylist([_clip_row(extra=1)]), CLIPS)


def test_nulls_in_required_column_rejected():
    table = pa.Table.from_pylist([_clip_row(video_id=None)], schema=CLIPS.schema.remove(1).insert(1, pa.field("video_id", pa.string())))
    with pytest.raises(SchemaError, match="column 'video_id' has nulls but is not nullable"):
        validate_table(table, CLIPS)


def test_string_flavours_and_column_order_normalised():
    row = {"item_id": "a", "stage": "clip", "error_kind": "corrupt", "message": "m", "detail": None}
    table = pa.table({k: pa.array([v], pa.large_string() if k != "detail" else pa.null()) for k, v in reversed(row.items())})
    out = validate_table(table, FAILURES)
    assert out.schema.equals(FAILURES.schema) and out.column_names == FAILURES.columns


def test_a_column_added_in_a_later_version_reads_as_null_from_older_files():
    from data_schemas import FAILURES

    old = pa.Table.from_pylist([{"item_id": "v", "stage": "clip", "error_kind": "corrupt", "message": "m", "detail": None}])
    upgraded = validate_table(old, FAILURES)  # a failures file written by schema version 1
    assert upgraded.column_names == FAILURES.columns and upgraded["failure_class"].to_pylist() == [None]
    row = _clip_row()
    del row["n_frames"]  # a column every version had is still required
    with pytest.raises(SchemaError, match=r"column 'n_frames' \(int32\) is missing"):
        validate_table(pa.Table.from_pylist([row]), CLIPS)
