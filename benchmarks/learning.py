"""Does training learn, and does RL add to SFT? Held-out accuracy of no training, SFT, SFT then GRPO,
and SFT alone for as many optimizer steps, on a synthetic, verifiable video QA set, with the tiny
model on CPU (the shape of the paper's Table 4 and of its data recipe).

    python benchmarks/learning.py [--workdir DIR] [--seed 1] [--videos 600] [--sft-steps N] [--grpo-steps N] ...

The set (`tasks.samples.synth`): coloured-segment videos whose colours come back, with one question
per kind of `KINDS` per video. Two kinds read one observation (the first, the last colour); four
compose several across the video: the colour shown longest in total and the colour right after
the longest segment (multiple choice), how many separate times the first colour is shown and
whether the video ends on its first colour (open-ended). The SFT target's thinking is the answer
in a sentence or (`--reasoning chain`) every slot's colour in order and then the derivation (the
paper's CoT-SFT shape). As in the paper, the SFT split is small next to the RL split.

Four models from the real stages, in three workdirs under the root:

1. `sft/`: the set, then SFT (torchrun, DeepSpeed) on the sft split.
2. `rl/`: RL items chosen by the paper's filter rule for the model RL starts from: the SFT model
   answers every rl question `--pass-samples` times as GRPO samples (its temperature and length),
   graded as GRPO's reward grades; the questions it gets right sometimes but not always (medium,
   `tasks.grading.difficulty`) stay in the rl split, the others move to `unused` (`--rl-items all`
   keeps them all, leaving the choice to GRPO's dropping of groups whose rewards are all equal).
   The SFT model is copied in, GRPO (MR-SP) trains from it on those items, and eval scores the
   base model (none), SFT and GRPO.
3. `matched/`: the set again and SFT alone for sft + grpo optimizer steps: the control for "GRPO
   only helped because it trained longer".

Eval answers the eval split greedily and grades with `tasks.grading.answers` (option letters,
normalised open-ended answers), the grader of GRPO's reward. Accuracies per kind and overall, the
overall one with a 95 % Wilson interval over the eval questions. Every stage's settings are printed.
The defaults were chosen in exploratory runs on the set of seed 0; the default seed 1 draws other
videos, questions and splits. GRPO settings tried from the default SFT (600 steps unless said), as
seed: GRPO steps x questions x group, lr, beta -> none / sft / grpo / matched_sft (%):

    0: 100 x 32 x 8,  5e-4, 0.04 -> 0.0 / 46.5 / 62.5 / 51.9   (seed 1: 0.0 / 56.0 / 60.4 / 62.4)
    0:  50 x 64 x 8,  1e-3, 0.04 -> 0.0 / 46.5 / 63.2 / 49.3   (seed 1: 0.0 / 56.0 / 60.1 / 61.0)
    0:  50 x 32 x 16, 1e-3, 0.04 -> 0.0 / 46.5 / 49.2 / 49.3   (fewer questions per step: less gain)
    0:  50 x 64 x 8,  1e-3, 0    -> 0.0 / 46.5 / 45.3 / 49.3   (no KL: "same ends" collapses to the answer "2")
    0:  50 x 64 x 8,  1e-3, 0.04 -> 0.0 / 31.1 / 33.5 / 34.3   (SFT 300 steps: too little to build on)
    0: 150 x 64 x 8,  1e-3, 0.04 -> 0.0 / 46.5 / 60.6 / 55.7   (the defaults)
    2:  50 x 64 x 8,  1e-3, 0.04 -> 0.0 / 58.9 / 58.1 / 59.2

On seed 1 the defaults give 0.0 / 56.0 / 63.3 / 55.6: GRPO +7.3 points over SFT (paired 95 % CI
+4.3 to +10.4) and +7.8 over SFT alone for as many steps (+4.7 to +10.9), the "after the longest"
kind (composed) 24 -> 42 %; on seed 3, run once with the defaults, 0.0 / 55.7 / 64.4 / 61.7 (GRPO
+8.8 [+5.2, +12.3] over SFT, +2.8 [-0.3, +5.9] over the control). Two settings of the table were run
on seed 1 (50 and 150 GRPO steps); the shorter one was not above the control. The control itself moves with its step count (seed 1:
61.0 after 650 SFT steps, 55.6 after 750): SFT on 360 questions at this rate oscillates.
GRPO gains most where SFT leaves perception (first, last, longest colour) to learn; "returns" and
"same ends" it did not move in any setting.

The last line is machine-readable: `learning none=A sft=B grpo=C matched_sft=D` (accuracy in %,
eval split).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_schemas import EVAL_ITEMS, FILTER, RL_SPLIT, UNUSED_SPLIT  # noqa: E402
from models.vlm import HFVideoLM, VideoPrompt  # noqa: E402
from tasks.config import GRPOConfig, load_config  # noqa: E402
from tasks.engine.manifest import output_identity, read_manifest  # noqa: E402
from tasks.engine.run import run_stage  # noqa: E402
from tasks.engine.stage import ShardResult, Stage, StageContext, StageError, WorkItem, read_stage_table  # noqa: E402
from tasks.engine.store import Workdir, stable_hash  # noqa: E402
from tasks.eval.stage import EvalStage  # noqa: E402
from tasks.grading.answers import grade  # noqa: E402
from tasks.grading.difficulty import EASY, HARD, MEDIUM, difficulty  # noqa: E402
from tasks.grading.intervals import PairedDifference, paired_difference, wilson_interval  # noqa: E402
from tasks.grading.prompts import sampling_seed  # noqa: E402
from tasks.grpo.data import RLExample, load_rl_examples  # noqa: E402
from tasks.grpo.stage import GRPOStage  # noqa: E402
from tasks.media.frames import read_video_frames  # noqa: E402
from tasks.samples.synth import KINDS as QUESTION_KINDS  # noqa: E402
from tasks.samples.synth import SynthSpec, write_synth  # noqa: E402
from tasks.sft.stage import SFTStage  # noqa: E402
from tasks.training.loop import MODEL_DIR  # noqa: E402

KINDS = ("first", "last", "longest", "after_longest", "returns", "same_ends")
MODELS = ("none", "sft", "grpo", "matched_sft")  # in the order of the last line
ANSWER_BATCH = 32  # questions per generate call when measuring pass rates


def synth_spec(args: argparse.Namespace) -> SynthSpec:
    return SynthSpec(
        videos=args.videos, segments=4, kinds=KINDS, repeats=True, reasoning=args.reasoning,
        eval_fraction=0.2, sft_fraction=args.sft_fraction, seed=args.seed,
    )


def overrides(args: argparse.Namespace, num_frames: int) -> dict[str, Any]:
    return {
        "filter.model": "tiny", "sft.model": "tiny", "sft.sp_degree": 1, "sft.nproc_per_node": 1, "sft.max_steps": args.sft_steps,
        "sft.micro_batch_size": 8, "sft.learning_rate": args.sft_lr, "sft.warmup_ratio": 0.05, "sft.num_frames": num_frames,
        "sft.save_every": 100,
        "grpo.model": "sft", "grpo.steps": args.grpo_steps, "grpo.prompts_per_step": args.prompts_per_step,
        "grpo.group_size": args.group_size, "grpo.learning_rate": args.grpo_lr, "grpo.beta": args.beta,
        "grpo.max_new_tokens": args.max_new_tokens, "grpo.num_frames": num_frames, "grpo.micro_batch_size": 32, "grpo.save_every": 100,
        "eval.models": ["base", "sft", "grpo"], "eval.num_frames": num_frames, "eval.max_new_tokens": args.max_new_tokens,
        "eval.batch_size": 32,
        # The synthetic frames at the model's own size, as the numbers in the README were measured (the tiny
        # profile budgets 12 tokens a frame for the sample's long videos).
        "sft.tokens_per_frame": None, "grpo.tokens_per_frame": None, "eval.tokens_per_frame": None,
        # The palette in its one order, as SFT taught it and as the README's numbers were measured (the tiny
        # profile shuffles the sample's options, whose RL split over-represents one letter).
        "grpo.shuffle_options": False,
    }


def run_stages(ctx: StageContext, stages: list[Stage]) -> None:
    for stage in stages:
        started = time.perf_counter()
        result = run_stage(stage, ctx)
        print(f"{stage.name}: {result.status} in {time.perf_counter() - started:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------
# RL items: what the model RL starts from gets right sometimes but not always
# ------------------------------------------------------------------------------------------------
def pass_counts(model_dir: str, examples: list[RLExample], cfg: GRPOConfig, samples: int) -> dict[str, int]:
    """How many of `samples` answers the model gets right per question, drawn as GRPO's rollouts are
    (its temperature, top-p and length), graded as GRPO's reward grades them."""
    lm = HFVideoLM(model_dir, budget=cfg.video_budget())
    sampling = cfg.frame_sampling()
    examples = sorted(examples, key=lambda e: (e.video_id, e.qa_id))  # a batch shares its videos' frames
    counts: dict[str, int] = {}
    for start in range(0, len(examples), ANSWER_BATCH):
        batch = examples[start : start + ANSWER_BATCH]
        frames = {uri: read_video_frames(uri, sampling) for uri in dict.fromkeys(e.video_uri for e in batch)}
        encoded = lm.encode([VideoPrompt(e.messages(), frames[e.video_uri]) for e in batch])
        generations = lm.generate_encoded(
            encoded, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            num_return_sequences=samples, seed=sampling_seed([e.qa_id for e in batch], cfg.seed),
        )
        for example, answers in zip(batch, generations):
            counts[example.qa_id] = sum(grade(a.text, example.answer_key()).correct for a in answers)
    return counts


class RLItemsStage(Stage):
    """The `filter` table of another workdir with the rl split's pass rates for the model RL starts
    from filled in, and the rl questions outside `keep` (difficulties) moved to the unused split."""

    name = "filter"
    code_version = "rl-items-1"
    output = FILTER

    def __init__(self, source: Workdir, counts: dict[str, int], samples: int, keep: tuple[str, ...]) -> None:
        self.source, self.counts, self.samples, self.keep = source, counts, samples, keep

    def settings(self, ctx: StageContext) -> dict[str, Any]:
        source = read_manifest(self.source, "filter")
        if source is None:
            raise StageError(f"no complete filter/ in {self.source.url} to choose rl items from")
        return {"source": output_identity(source), "counts": stable_hash(sorted(self.counts.items())), "samples": self.samples, "keep": self.keep}

    def list_items(self, ctx: StageContext) -> list[WorkItem]:
        return [WorkItem("rl-items", key=stable_hash(self.settings(ctx)))]

    def process_shard(self, ctx: StageContext, items: list[WorkItem]) -> ShardResult:
        rows = read_stage_table(self.source, "filter", FILTER).to_pylist()
        for row in rows:
            if row["split"] != RL_SPLIT:
                continue
            n_correct = self.counts[row["qa_id"]]
            row.update(n_runs=self.samples, n_correct=n_correct, pass_rate=n_correct / self.samples, model="sft")
            row["difficulty"] = difficulty(row["pass_rate"], 1.0, 0.0)  # the paper's rule: medium = sometimes right
            if row["difficulty"] not in self.keep:
                row["split"] = UNUSED_SPLIT
        return ShardResult({FILTER.name: FILTER.from_rows(rows)}, [])


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------
def eval_verdicts(workdir: Path) -> dict[str, list[dict[str, Any]]]:
    """Per eval model label, its (qa_id, correct) rows."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in read_stage_table(Workdir(str(workdir)), "eval", EVAL_ITEMS).to_pylist():
        by_model.setdefault(row["model"], []).append({"qa_id": row["qa_id"], "correct": row["correct"]})
    return by_model


def print_scores(verdicts: dict[str, list[dict[str, Any]]], kind_of: dict[str, str]) -> None:
    """Accuracy per question kind and overall, with 95 % Wilson intervals."""
    print(f"{'model':<12}" + "".join(f"{kind:>15}" for kind in KINDS) + f"{'overall (95 % CI)':>28}")
    for model in MODELS:
        rows = verdicts[model]
        cells = []
        for kind in KINDS:
            mine = [r["correct"] for r in rows if kind_of[r["qa_id"]] == kind]
            cells.append(f"{100 * sum(mine) / len(mine):14.1f}%")
        correct = sum(r["correct"] for r in rows)
        low, high = wilson_interval(correct, len(rows))
        overall = f"{correct}/{len(rows)} = {100 * correct / len(rows):.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
        print(f"{model:<12}" + "".join(cells) + f"{overall:>28}")


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> PairedDifference:
    """`a`'s accuracy minus `b`'s on the same questions (matched by qa_id), with its paired 95 % interval."""
    correct_b = {r["qa_id"]: r["correct"] for r in b}
    if {r["qa_id"] for r in a} != set(correct_b) or len(a) != len(b):
        raise ValueError(f"need the same questions for both models, got {len(a)} and {len(b)}")
    return paired_difference([r["correct"] for r in a], [correct_b[r["qa_id"]] for r in a])


def kinds_of(root: Path) -> dict[str, str]:
    """qa_id -> question kind, from the set's questions."""
    kind_by_question = {kind.question: name for name, kind in QUESTION_KINDS.items()}
    rows = read_stage_table(Workdir(str(root / "sft")), "filter", FILTER).to_pylist()
    return {r["qa_id"]: kind_by_question[r["question"]] for r in rows}


def run(root: Path, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    spec = synth_spec(args)
    settings = overrides(args, spec.num_frames)
    config = load_config("tiny", settings)
    print(f"synthetic set: {spec}", flush=True)
    for section in ("sft", "grpo", "eval"):
        print(f"{section}: {getattr(config, section).output_settings()}")
    print(f"rl items: {args.rl_items} for the SFT model over {args.pass_samples} sampled answers", flush=True)

    sft_ctx = StageContext(Workdir(str(root / "sft")), config)
    report = write_synth(sft_ctx.workdir, spec)
    splits = Counter(r["split"] for r in read_stage_table(sft_ctx.workdir, "filter", FILTER).to_pylist())
    print(f"synthetic set: {report.rows} questions about {spec.videos} videos ({spec.num_frames} frames each) in {root}: {dict(splits)}")
    run_stages(sft_ctx, [SFTStage()])

    started = time.perf_counter()
    sft_model = str(root / "sft" / "sft" / MODEL_DIR)
    rl_examples = load_rl_examples(sft_ctx.workdir)
    counts = pass_counts(sft_model, rl_examples, config.grpo, args.pass_samples)
    labels = Counter(difficulty(n / args.pass_samples, 1.0, 0.0) for n in counts.values())
    print(f"pass rates of the SFT model on {len(rl_examples)} rl questions in {time.perf_counter() - started:.0f} s: {dict(labels)}")

    rl_ctx = StageContext(Workdir(str(root / "rl")), config)
    keep = (MEDIUM,) if args.rl_items == "medium" else (EASY, MEDIUM, HARD)
    run_stages(rl_ctx, [RLItemsStage(sft_ctx.workdir, counts, args.pass_samples, keep)])
    shutil.copytree(root / "sft" / "sft", root / "rl" / "sft", dirs_exist_ok=True)
    run_stages(rl_ctx, [GRPOStage(), EvalStage()])

    matched_ctx = StageContext(
        Workdir(str(root / "matched")),
        load_config("tiny", {**settings, "sft.max_steps": args.sft_steps + args.grpo_steps, "eval.models": ["sft"]}),
    )
    write_synth(matched_ctx.workdir, spec)
    run_stages(matched_ctx, [SFTStage(), EvalStage()])

    main = eval_verdicts(root / "rl")
    return {"none": main["base"], "sft": main["sft"], "grpo": main["grpo"], "matched_sft": eval_verdicts(root / "matched")["sft"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="keep the runs here: DIR/sft, DIR/rl, DIR/matched (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=1, help="synthetic set seed (the settings were chosen on seed 0)")
    parser.add_argument("--videos", type=int, default=600)
    parser.add_argument("--sft-fraction", type=float, default=0.1, help="share of the videos in the sft split (eval takes 0.2, rl the rest)")
    parser.add_argument("--reasoning", choices=("chain", "answer"), default="chain", help="the SFT target's thinking (see tasks.samples.synth)")
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--grpo-steps", type=int, default=150)
    parser.add_argument("--grpo-lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.04, help="KL weight")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=40, help="longest rollout and eval answer")
    parser.add_argument("--pass-samples", type=int, default=4, help="sampled answers per rl question to tell medium items")
    parser.add_argument("--rl-items", choices=("medium", "all"), default="medium")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    if args.workdir:
        root = Path(args.workdir).resolve()
        verdicts = run(root, args)
        kind_of = kinds_of(root)
    else:
        with tempfile.TemporaryDirectory(prefix="lvr-bench-learning-") as tmp:
            verdicts = run(Path(tmp), args)
            kind_of = kinds_of(Path(tmp))
    print(f"wall time {time.perf_counter() - started:.0f} s")
    print_scores(verdicts, kind_of)
    accuracy = {m: 100 * sum(r["correct"] for r in rows) / len(rows) for m, rows in verdicts.items()}
    holds = accuracy["grpo"] >= accuracy["sft"] + 5 and accuracy["grpo"] > accuracy["matched_sft"]
    gaps = {other: paired(verdicts["grpo"], verdicts[other]) for other in ("sft", "matched_sft")}
    print(f"grpo >= sft + 5 points and grpo > matched sft: {'yes' if holds else 'no'} (paired over the eval questions, 95 % CI: "
          + ", ".join(f"grpo - {o} = {100 * d.difference:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]" for o, d in gaps.items()) + ")")
    print("learning " + " ".join(f"{m}={accuracy[m]:.1f}" for m in MODELS))


if __name__ == "__main__":
    main()
