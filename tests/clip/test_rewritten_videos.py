"""A source video rewritten with new content is a new video, even with its size and modification time."""

from __future__ import annotations

import os

import pandas as pd

from models.video import FrameSampling
from tasks.config import load_config
from tasks.engine.store import Workdir
from tasks.grpo.data import RLExample
from tasks.pipeline import run_pipeline
from tests.support.videos import make_video


def same_size(a, b) -> None:
    """Pad the smaller file with zeros (an MP4 ignores trailing bytes) so both have one size."""
    size = max(a.stat().st_size, b.stat().st_size)
    for path in (a, b):
        with open(path, "ab") as fh:
            fh.write(b"\0" * (size - path.stat().st_size))


def test_new_content_under_the_old_name_size_and_mtime_is_recomputed(tmp_path):
    source = tmp_path / "videos"
    kept = make_video(source / "kept.mp4", 12, gop=25, audio=False, source="rgbtestsrc")
    video = make_video(source / "video.mp4", 12, gop=25, audio=False, source="testsrc2")
    replacement = make_video(tmp_path / "replacement.mp4", 12, gop=25, audio=False, source="smptebars")
    same_size(video, replacement)
    workdir = Workdir(str(tmp_path / "wd"))
    config = load_config("tiny", ["caption.max_new_tokens=4"])
    run_pipeline(workdir, config, source=str(source), to_stage="caption")
    before = pd.read_parquet(tmp_path / "wd" / "clip" / "_videos").set_index("uri")["video_id"]
    stat = video.stat()
    os.replace(replacement, video)
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or `rsync -t` would leave it
    assert (video.stat().st_size, video.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)

    record = run_pipeline(workdir, config, source=str(source), to_stage="caption")
    assert record.results["clip"]["status"] == "done"
    after = pd.read_parquet(tmp_path / "wd" / "clip" / "_videos").set_index("uri")["video_id"]
    assert after[str(kept)] == before[str(kept)] and after[str(video)] != before[str(video)]
    clip_manifest = pd.read_json(tmp_path / "wd" / "clip" / "_manifest.json", typ="series")
    assert clip_manifest["items_computed"] == 1  # only the rewritten video was cut again
    captions = pd.read_parquet(tmp_path / "wd" / "caption")
    assert set(captions["video_id"]) == {after[str(kept)], after[str(video)]}  # its clips were captioned anew
    # The embedding cache is keyed by the content id: the new content gets its own entries.
    ask = dict(qa_id="q", video_uri=str(video), question_type="open_ended", question="?", options=None, answer="a", prompt="?")
    old, new = RLExample(video_id=before[str(video)], **ask), RLExample(video_id=after[str(video)], **ask)
    assert old.video_key(FrameSampling(num_frames=16)) != new.video_key(FrameSampling(num_frames=16))
