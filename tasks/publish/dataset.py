"""The dataset as the Hugging Face `datasets` layout: one Parquet file per split of the filter table
(`data/<split>-00000-of-00001.parquet`), declared in the card's front matter so that
`datasets.load_dataset(folder)` reads exactly those splits.

Rows keep every FILTER column; `video_uri` references the source video (path or URL), the videos
themselves are not copied. Items of the `unused` split are not published. A split without rows has
no file and is not declared: `datasets` cannot read an empty Parquet file."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import EVAL_SPLIT, FILTER, RL_SPLIT, SFT_SPLIT, SPLITS
from tasks.engine.stage import read_stage_table
from tasks.engine.store import LOCAL, Workdir, is_local_uri, write_table_atomic
from tasks.publish.provenance import PublishError, required_manifest

PUBLISHED_SPLITS = (SFT_SPLIT, RL_SPLIT, EVAL_SPLIT)
DATA_DIR = "data"
DATASET_STAGE = "filter"


def split_file(split: str) -> str:
    """A split's file under the dataset folder, named as the Hub names converted Parquet shards."""
    return f"{DATA_DIR}/{split}-00000-of-00001.parquet"


@dataclass(frozen=True)
class DatasetCounts:
    """Counts of the filter table: per split (every split, `unused` included), and per split by
    category and by difficulty."""

    rows: int
    per_split: dict[str, int]
    by_category: dict[str, dict[str, int]]
    by_difficulty: dict[str, dict[str, int]]

    @property
    def published_rows(self) -> int:
        return sum(self.per_split[s] for s in PUBLISHED_SPLITS)


def count_rows(rows: list[dict[str, Any]]) -> DatasetCounts:
    per_split = {s: 0 for s in SPLITS} | Counter(r["split"] for r in rows)
    by_category: dict[str, dict[str, int]] = {}
    by_difficulty: dict[str, dict[str, int]] = {}
    for r in rows:
        cats = by_category.setdefault(r["split"], {})
        cats[r["category"]] = cats.get(r["category"], 0) + 1
        diffs = by_difficulty.setdefault(r["split"], {})
        diffs[r["difficulty"]] = diffs.get(r["difficulty"], 0) + 1
    return DatasetCounts(len(rows), dict(per_split), by_category, by_difficulty)


@dataclass(frozen=True)
class DatasetFiles:
    """What `write_dataset_files` wrote: the declared splits and their files (relative to the
    dataset folder), the counts, and how many distinct videos are referenced by local path."""

    files: dict[str, str]
    counts: DatasetCounts
    manifest: dict[str, Any]
    videos: int
    local_videos: int


def read_filter(workdir: Workdir) -> tuple[pa.Table, dict[str, Any]]:
    """The filter table and its manifest, which must agree on the number of rows (a table changed
    after its manifest was written is not what the manifest describes)."""
    manifest = required_manifest(workdir, DATASET_STAGE)
    table = read_stage_table(workdir, DATASET_STAGE, FILTER)
    if table.num_rows != int(manifest["rows"]):
        raise PublishError(
            f"{workdir.uri(DATASET_STAGE)} holds {table.num_rows} rows but its manifest says {manifest['rows']}: "
            f"rerun the filter stage (lvr run --workdir {workdir.url} --from filter --to filter)"
        )
    return table, manifest


def write_dataset_files(workdir: Workdir, folder: Path) -> DatasetFiles:
    table, manifest = read_filter(workdir)
    files = {}
    for split in PUBLISHED_SPLITS:
        part = table.filter(pc.equal(table["split"], split))
        if part.num_rows:
            files[split] = split_file(split)
            write_table_atomic(LOCAL, str(folder / files[split]), part, FILTER)
    if not files:
        raise PublishError(f"{workdir.uri(DATASET_STAGE)} puts no question in {', '.join(PUBLISHED_SPLITS)}: there is nothing to publish")
    published = table.filter(pc.is_in(table["split"], pa.array(PUBLISHED_SPLITS)))
    videos = set(published["video_uri"].to_pylist())
    local = sum(1 for uri in videos if is_local_uri(uri))
    return DatasetFiles(files, count_rows(table.to_pylist()), manifest, len(videos), local)
