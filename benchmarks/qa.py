"""QA stage throughput against an OpenAI-compatible server answering each request after 50 ms.

The real stage (`run_stage(QAStage())`, fresh workdir, empty answer cache) against the test server
of `tests/support/openai_server.py`, run in its own process so that it does not share a GIL with the stage.
The simulated R1 answers every generation request with real items about the very captions in its
prompt (so each video's refinements are distinct requests) behind a `<think>` preamble, and every
refinement with R1-style steps. Items/s for `qa.concurrency` 1, 8 and 32: with latency-bound
requests this should scale close to linearly up to the limit. The last line is machine-readable.

    python benchmarks/qa.py [--videos 12] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.openai_server import (  # noqa: E402
    OpenAITestServer,
    Reply,
    RequestInfo,
    caption_rows,
    is_refine_request,
    refined_reply,
    request_kind,
)
from tests.support.stand_ins import Published  # noqa: E402

from data_schemas import CAPTIONS  # noqa: E402
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir
from tasks.qa.captions import Clip, VideoCaptions  # noqa: E402
from tasks.qa.stage import QAStage  # noqa: E402
from tasks.qa.template import draft_questions, render_answer  # noqa: E402

CAPTION_LINE = re.compile(r"^From (\d+):(\d\d) to (\d+):(\d\d): (.*)$", re.MULTILINE)
SUBJECTS = ["a cyclist", "two children", "a baker", "an old fisherman", "a street musician", "a nurse", "a chess player", "a potter"]
ACTIONS = ["unlocks a red door", "pours water into a kettle", "climbs a narrow staircase", "waves at a passing tram",
           "folds a blue towel", "feeds pigeons in a square", "ties a knot in a rope", "paints a wooden fence"]


def simulated_r1(info: RequestInfo) -> Reply:
    if is_refine_request(info):
        return refined_reply(info)
    category, qtype = request_kind(info)
    clips = tuple(
        Clip(str(i), int(a) * 60 + int(b), int(c) * 60 + int(d), text) for i, (a, b, c, d, text) in enumerate(CAPTION_LINE.findall(info.text))
    )
    drafts = draft_questions(VideoCaptions(clips[0].caption, clips), category, qtype, 1)
    thinking = f"Let me go through the {len(clips)} scenes and find a {category} question that needs several of them."
    return Reply(f"<think>\n{thinking}\n</think>\n\n```json\n{render_answer(drafts)}\n```")


def serve(latency_s: float, conn) -> None:
    """The server process: answers commands over `conn` until told to stop."""
    server = OpenAITestServer(simulated_r1, latency_s=latency_s).start()
    conn.send(server.port)
    while (command := conn.recv()) != "stop":
        if command == "reset":
            server.reset_counters()
        conn.send((server.total_requests, server.max_in_flight))
    server.stop()


def videos(n: int) -> list[dict]:
    rows = []
    for v in range(n):
        captions = [
            (i * 10.0, (i + 1) * 10.0, f"In scene {i + 1} of video {v}, {SUBJECTS[(v + i) % 8]} {ACTIONS[(3 * v + i) % 8]} near landmark {v * 10 + i}.")
            for i in range(6)
        ]
        rows += caption_rows(f"video{v:03d}", captions)
    return rows


def run(port: int, conn, rows: list[dict], concurrency: int, scratch: Path) -> tuple[int, float, int, int]:
    workdir = scratch / f"wd-c{concurrency}"
    shutil.rmtree(workdir, ignore_errors=True)
    overrides = {"qa.backend": "openai", "qa.base_url": f"http://127.0.0.1:{port}/v1", "qa.model": "deepseek-reasoner",
                 "qa.concurrency": concurrency, "qa.shard_size": 10_000, "qa.timeout_s": 60}
    ctx = StageContext(workdir=Workdir(str(workdir)), config=load_config("tiny", overrides))
    run_stage(Published("caption", CAPTIONS, rows), ctx)
    conn.send("reset")
    conn.recv()
    started = time.perf_counter()
    report = run_stage(QAStage(), ctx)
    elapsed = time.perf_counter() - started
    conn.send("stats")
    requests, max_in_flight = conn.recv()
    return report.rows, elapsed, requests, max_in_flight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--latency", type=float, default=0.05, help="server latency per request, seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    server = ctx.Process(target=serve, args=(args.latency, child_conn), daemon=True)
    server.start()
    port = conn.recv()
    rows = videos(args.videos)
    scratch = Path(tempfile.mkdtemp(prefix="lvr-bench-qa-"))
    rates = {}
    try:
        print(f"qa benchmark: {args.videos} videos x 8 generation requests (+1 refinement per item), {args.latency * 1000:.0f} ms per request")
        for concurrency in (1, 8, 32):
            items, elapsed, requests, max_in_flight = run(port, conn, rows, concurrency, scratch)
            rates[concurrency] = items / elapsed
            print(
                f"concurrency={concurrency:>2}: {items} items, {requests} requests in {elapsed:.2f}s = {rates[concurrency]:.1f} items/s "
                f"({requests / elapsed:.0f} requests/s, max in flight {max_in_flight}, ideal {concurrency / args.latency:.0f} requests/s)"
            )
    finally:
        conn.send("stop")
        server.join(timeout=10)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"qa_speedup_c8_vs_c1={rates[8] / rates[1]:.2f}")
    print(f"qa_speedup_c32_vs_c1={rates[32] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
