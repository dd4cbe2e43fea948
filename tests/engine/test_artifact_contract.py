"""The artifact contract as users consume it: pandas, HF datasets, fsspec workdirs."""

from __future__ import annotations

import json

import fsspec
import pandas as pd
import pytest

from tasks.clip.stage import ClipStage
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir
from tests.support.videos import make_video


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    make_video(root / "a.mp4", 15, fps=25, gop=25)
    (root / "bad.mp4").write_bytes(b"\x00" * 100)
    return root


def test_stage_dir_loads_with_pandas_and_datasets(tmp_path, source):
    import datasets

    run_stage(ClipStage(), StageContext(Workdir(str(tmp_path / "wd")), load_config("tiny"), source=str(source)))
    stage = tmp_path / "wd" / "clip"
    df = pd.read_parquet(stage)
    ds = datasets.load_dataset("parquet", data_files=str(stage / "part-*.parquet"), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(df) == 2 and ds.column_names == list(df.columns)
    assert sorted(ds["clip_id"]) == sorted(df["clip_id"])
    assert len(pd.read_parquet(stage / "_videos")) == 1


def test_fsspec_workdir(source):
    """A non-local workdir (fsspec's in-memory filesystem standing in for object storage)."""
    url = "memory://lvr-test/run1"
    report = run_stage(ClipStage(), StageContext(Workdir(url), load_config("tiny"), source=str(source)))
    fs = fsspec.filesystem("memory")
    manifest = json.loads(fs.cat("/lvr-test/run1/clip/_manifest.json"))
    assert manifest["rows"] == report.rows == 2 and manifest["failures"] == 1
    with fs.open("/lvr-test/run1/clip/part-00000.parquet", "rb") as fh:
        clips = pd.read_parquet(fh)
    # Clip media went to the workdir's filesystem too, addressed by URL.
    assert all(uri.startswith("memory://") and fs.exists(uri) for uri in clips["clip_uri"])
    assert not any(".tmp-" in p for p in fs.find("/lvr-test"))
    again = run_stage(ClipStage(), StageContext(Workdir(url), load_config("tiny"), source=str(source)))
    assert again.status == "cached"
