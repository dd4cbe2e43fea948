"""The clip stage probes each video once: one ffprobe, one in-process read of the source, one ffmpeg
cut, and at most one in-process header read per clip it wrote, however many clips a video yields."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import av
import pandas as pd

from tasks.clip.stage import ClipStage
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir
from tasks.media import ffmpeg
from tests.support.videos import make_video


def test_one_ffprobe_and_one_cut_per_video(tmp_path, monkeypatch):
    source = tmp_path / "videos"
    make_video(source / "a.mp4", 31, gop=25)  # 3 clips of ~10 s
    make_video(source / "b.mp4", 22, gop=25, audio=False)  # 2 clips
    tools: Counter[str] = Counter()
    opened: list[str] = []
    real_run_tool, real_open = ffmpeg.run_tool, av.open

    def counting_run_tool(argv, **kwargs):
        tools[Path(argv[0]).name] += 1
        return real_run_tool(argv, **kwargs)

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(ffmpeg, "run_tool", counting_run_tool)
    monkeypatch.setattr(av, "open", counting_open)

    cfg = load_config("tiny", ["clip.mode=copy"])
    run_stage(ClipStage(), StageContext(workdir=Workdir(str(tmp_path / "wd")), config=cfg, source=str(source)))

    clips = pd.read_parquet(tmp_path / "wd" / "clip")
    assert sorted(clips.groupby("video_id").size()) == [2, 3]
    assert tools == {"ffprobe": 2, "ffmpeg": 2}
    # Per video one open of the source (its index, or its packets); per clip one header read, none of the sources reread.
    assert sorted(Path(p).name for p in opened if p.endswith(".mp4") and "/videos/" in p) == ["a.mp4", "b.mp4"]
    assert sum(1 for p in opened if "/_media/" in p) == len(clips)
