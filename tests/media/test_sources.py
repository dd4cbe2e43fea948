"""Listing sources: literal paths, `glob:`, names that are not UTF-8, and the shrink guard."""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest

from tasks.config import load_config
from tasks.engine.stage import StageError
from tasks.engine.store import Workdir, url_to_fs
from tasks.media.cache import local_copy
from tasks.media.sources import SourceError, check_listing, list_sources, location_uri
from tasks.pipeline import run_pipeline
from tasks.preflight.findings import PreflightError
from tests.support.videos import make_video

EXTS = (".mp4",)


def test_paths_with_glob_characters_are_taken_literally(tmp_path):
    folder = tmp_path / "a [b] *c?"
    make_video(folder / "one.mp4", 1, audio=False)
    make_video(folder / "two.mp4", 1, audio=False)
    (tmp_path / "a b").mkdir()  # what `[b]` would match as a glob class: must not be listed
    make_video(tmp_path / "a b" / "other.mp4", 1, audio=False)
    listed = list_sources(str(folder), EXTS)
    assert [v.uri for v in listed] == [str(folder / "one.mp4"), str(folder / "two.mp4")]
    assert [v.uri for v in list_sources(f"glob:{tmp_path}/a b/*.mp4", EXTS)] == [str(tmp_path / "a b" / "other.mp4")]
    with pytest.raises(SourceError, match=r"does not exist \(paths are taken literally; for a pattern write glob:"):
        list_sources(str(tmp_path / "*.mp4"), EXTS)


def test_names_that_are_not_utf8_are_listed_escaped_and_read_back(tmp_path):
    video = make_video(tmp_path / "plain.mp4", 1, audio=False)
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9 clip.mp4")  # latin-1, not UTF-8
    os.rename(video, odd)
    (listed,) = list_sources(str(tmp_path), EXTS)
    assert listed.uri == f"file://{tmp_path}/caf%E9%20clip.mp4" and listed.size == os.path.getsize(odd)
    assert listed.uri.encode("utf-8")  # storable in Arrow
    fs, path = url_to_fs(listed.uri)
    assert os.fsencode(path) == odd
    with local_copy(listed.uri) as local:
        assert os.fsencode(local) == odd and local.read_bytes()[:8] == open(odd, "rb").read(8)
    assert location_uri(str(tmp_path / "ok é.mp4")) == str(tmp_path / "ok é.mp4")  # valid UTF-8 stays a plain path


def test_listing_rules():
    check_listing("s", 10, None, 0.5, False)  # first run
    check_listing("s", 6, 10, 0.5, False)  # within the allowed shrink
    check_listing("s", 4, 10, 0.5, True)  # asked for
    with pytest.raises(SourceError, match="source 's' lists no videos; the last complete run listed 10"):
        check_listing("s", 0, 10, 0.5, True)  # never, even when shrinking is allowed
    with pytest.raises(SourceError, match="lists no videos"):
        check_listing("s", 0, None, 0.5, False)
    with pytest.raises(SourceError, match=r"lists 4 videos; the last complete run listed 10 \(below clip.max_shrink=0.5"):
        check_listing("s", 4, 10, 0.5, False)


@pytest.mark.slow
def test_an_emptied_or_shrunk_source_changes_nothing(tmp_path):
    source = tmp_path / "videos"
    for i in range(3):
        make_video(source / f"v{i}.mp4", 12, audio=False, gop=25)
    workdir = Workdir(str(tmp_path / "wd"))
    config = load_config("tiny", ["caption.max_new_tokens=4"])
    run_pipeline(workdir, config, source=str(source), to_stage="caption")

    def snapshot():
        return {
            p.relative_to(tmp_path / "wd"): p.read_bytes()
            for p in sorted((tmp_path / "wd").rglob("*")) if p.is_file() and "_runs" not in p.parts and "_lock.json" != p.name
        }

    before = snapshot()
    assert pq.read_table(tmp_path / "wd" / "clip").num_rows > 0
    for video in source.iterdir():
        video.unlink()
    with pytest.raises(StageError, match=f"source '{source}' lists no videos; the last complete run listed 3"):
        run_pipeline(workdir, config, source=str(source), to_stage="caption")
    assert snapshot() == before  # every table, manifest and shard as it was

    make_video(source / "v0.mp4", 12, audio=False, gop=25)  # 1 of 3: below half
    with pytest.raises(StageError, match="lists 1 videos; the last complete run listed 3"):
        run_pipeline(workdir, config, source=str(source), to_stage="caption")
    assert snapshot() == before
    shutil.rmtree(source)
    with pytest.raises(PreflightError, match="does not exist"):  # lvr check, before any stage
        run_pipeline(workdir, config, source=str(source), to_stage="clip")
    assert snapshot() == before
    allowed = load_config("tiny", ["caption.max_new_tokens=4", "execution.allow_shrink=true"])
    make_video(source / "v0.mp4", 12, audio=False, gop=25)
    run_pipeline(workdir, allowed, source=str(source), to_stage="clip")
    assert pq.read_table(tmp_path / "wd" / "clip" / "_videos").num_rows == 1
