"""Filter rollouts with the tiny model on CPU: one batched n=10 generation per question versus 10 calls.

    python benchmarks/filter.py [--questions 6] [--runs 10] [--frames 8] [--max-new-tokens 32] [--threads 1]

For the same questions about the sample videos (frames sampled across each whole video, the
training prompt), draws `--runs` answers per question two ways:

- batched: what the filter stage does: `HFVideoLM.encode` once, then one
  `generate_encoded(num_return_sequences=runs)` call;
- sequential: `runs` separate `HFVideoLM.generate` calls, each encoding the video again.

Both ways run question by question, interleaved, so they see the same load on a shared machine.
Prints time, generated tokens and vision-tower passes of each. The last line is machine-readable:
`filter_batched_speedup=X` (sequential time / batched time; the goal is >= 3).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models.video import FrameSampling, read_frames  # noqa: E402
from models.vlm import HFVideoLM, VideoPrompt  # noqa: E402
from tasks.grading.prompts import prompt_messages
from tasks.samples.videos import built_in_sample

QUESTIONS = [
    ("What happens first in the video?", "multiple_choice", ["A ball rolls in", "The light turns on", "A door opens", "Nothing moves"]),
    ("Where does the last scene take place?", "open_ended", None),
    ("Which event happens after the cut?", "multiple_choice", ["A car stops", "A bird lands", "The camera pans", "A man waves"]),
    ("What changes between the two scenes?", "open_ended", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads. One by default: the tiny model's ops are too small to gain from more, and on a shared "
        "machine multi-threaded timings swing with the load (threads wait on each other when a core is taken).",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    videos = sorted(built_in_sample().glob("*.mp4"))
    frames = [read_frames(str(v), FrameSampling(num_frames=args.frames)) for v in videos]
    prompts = [
        VideoPrompt(prompt_messages(*QUESTIONS[i % len(QUESTIONS)]), frames[i % len(frames)]) for i in range(args.questions)
    ]
    lm = HFVideoLM("tiny")
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0}
    lm.generate_encoded(lm.encode(prompts[:1]), num_return_sequences=args.runs, seed=0, **sampling)  # warm-up
    lm.generate(prompts[:1], seed=0, **sampling)

    batched_s = sequential_s = 0.0
    batched_tokens = sequential_tokens = batched_calls = sequential_calls = 0
    for i, prompt in enumerate(prompts):
        calls, started = lm.encoder_calls, time.perf_counter()
        samples = lm.generate_encoded(lm.encode([prompt]), num_return_sequences=args.runs, seed=i, **sampling)
        batched_s += time.perf_counter() - started
        batched_calls += lm.encoder_calls - calls
        batched_tokens += sum(g.tokens_out for g in samples[0])

        calls, started = lm.encoder_calls, time.perf_counter()
        for run in range(args.runs):
            ((sample,),) = lm.generate([prompt], seed=i * args.runs + run, **sampling)
            sequential_tokens += sample.tokens_out
        sequential_s += time.perf_counter() - started
        sequential_calls += lm.encoder_calls - calls

    speedup = sequential_s / batched_s
    print(f"{args.questions} questions x {args.runs} answers, {args.frames} frames, up to {args.max_new_tokens} new tokens, tiny model on CPU")
    print(f"batched    (1 call per question):       {batched_s:7.2f}s  {batched_tokens} tokens  {batched_tokens / batched_s:8.1f} tok/s  {batched_calls} tower passes")
    print(f"sequential ({args.runs} calls per question):      {sequential_s:7.2f}s  {sequential_tokens} tokens  {sequential_tokens / sequential_s:8.1f} tok/s  {sequential_calls} tower passes")
    print(f"filter_batched_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
