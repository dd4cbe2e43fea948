"""Eval stage: every model of `eval.models` answers the eval split; accuracy per reasoning category.

Items are (model, frame count, eval question) triples, id `<model>::<frames>::<qa_id>`, so shards
hold one model at one frame count (ids sort that way) and a model loads once per stage run.
A shard reads each video once per frame count (the one frame-sampling function, across the whole
source video as in training: `eval.num_frames`, or `eval.fps` labelled `eval.max_frames`, and each
`eval.frames_sweep` count; every one under the video token budget; `eval.prefetch_workers` processes
read and resize the next videos while the model answers a batch), puts each question to the model with the prompt the filter stage
stored for it (the training prompt, `tasks.grading.prompts`), draws `eval.samples` answers from one
encoding of the video (greedy for one sample), grades the answers with `tasks.grading.answers.grade`
(open-ended misses decided by the `judge:` section's LLM judge when set, `tasks.grading.judge`, as in
filter and GRPO) and takes the majority answer. Outputs: `eval/` (EVAL_ITEMS, one row per item),
`eval/_summary/` (EVAL_SUMMARY: model x category x frames, and an Overall row), `report/eval.md` with
its charts.

Models: `base` is `filter.model` (the model the dataset was filtered with), `sft` / `grpo` the
model the stage of that name wrote under the workdir, anything else a checkpoint folder or model
id. A missing sft / grpo model is skipped with a note; once it exists, its manifest fingerprint
enters the stage's inputs and the items' keys, so retraining reruns exactly that model's items.
Models in an object-store workdir (or named by such a URL) are downloaded once into the local
model cache (`tasks.training.models.local_model`) and loaded from there.

Failure rows (the run goes on): a malformed item (`bad_item`), a video that is unknown
(`unknown_video`) or unreadable (`unreadable_video`), an item the judge gave no usable verdict on
after retries (`judge_<kind>`; never the exact-match verdict instead). The summary counts only items
with a verdict. A model that cannot be loaded stops the stage; an unreachable judge fails the shard
(a rerun judges it); a judge that refuses us, or every request, stops the stage.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from data_schemas import EVAL_ITEMS, EVAL_SPLIT, EVAL_SUMMARY, FILTER, TableSchema
from models.prefetch import Prefetcher
from models.video import SampledFrames
from models.vlm import Generation, HFVideoLM, VideoPrompt, video_messages
from tasks.config import EvalConfig
from tasks.engine.manifest import output_identity, read_manifest
from tasks.engine.stage import (
    ShardResult,
    Stage,
    StageContext,
    StageError,
    WorkItem,
    read_stage_table,
)
from tasks.engine.store import Failure, Workdir, is_local_uri, stable_hash, url_to_fs
from tasks.grading.answers import AnswerKey, Grade, grade, normalize_answer
from tasks.grading.judge import (
    check_judge_reached,
    judge_all,
    judge_failure,
    judge_identity,
)
from tasks.grading.prompts import (
    MULTIPLE_CHOICE,
    category_order,
    posable_items,
    sampling_seed,
)
from tasks.media.frames import answer_in_batches, frames_by_video, iter_frames_by_video
from tasks.report.accuracy import CELL_FORMAT, OVERALL, accuracy_table, chance_accuracy, paired_comparisons
from tasks.report.charts import ACCURACY_PNG, FRAMES_PNG, accuracy_chart, frames_chart
from tasks.report.markdown import (
    inline_images,
    markdown_table,
    read_report_file,
    write_report_file,
)
from tasks.stages import TRAINING_STAGES
from tasks.training.loop import MODEL_DIR
from tasks.training.models import local_model, model_identity

log = logging.getLogger("lvr.eval")

BASE = "base"
SUMMARY_DIR = "_summary"
REPORT_FILE = "eval.md"
# What one answer depends on besides its model, frame count and question (those key the items).
ANSWER_SETTINGS = (
    "samples", "temperature", "top_p", "seed", "max_new_tokens", "batch_size", "judge", "fps", "tokens_per_frame", "max_video_tokens",
)
SAMPLING_KEYS = ("temperature", "top_p", "seed")  # unused by greedy answers (samples == 1)


# ------------------------------------------------------------------------------------------------
# What is evaluated
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalExample:
    """One eval question and what it takes to pose and grade it."""

    qa_id: str
    video_id: str
    video_uri: str
    category: str
    question_type: str
    question: str
    options: list[str] | None
    answer: str
    prompt: str  # the user turn's text after the video, as the model was trained with it


def eval_examples(filter_rows: Iterable[dict[str, Any]]) -> list[EvalExample]:
    """The eval split of the filter table, by qa_id: the only place that maps the filter table's
    columns to eval questions."""
    examples = [
        EvalExample(
            r["qa_id"], r["video_id"], r["video_uri"], r["category"], r["question_type"], r["question"],
            list(r["options"]) if r["options"] is not None else None, r["answer"], r["prompt"],
        )
        for r in filter_rows
        if r["split"] == EVAL_SPLIT
    ]
    return sorted(examples, key=lambda e: e.qa_id)


@dataclass(frozen=True)
class EvalModel:
    label: str  # the eval.models entry
    path: str  # a local folder, a model id, or a folder's URL in object storage (fetched before loading)
    identity: str  # changes whenever the weights behind `path` may have changed
    revision: str | None = None  # the pinned revision of a hub model id


def _folder_signature(path: Path) -> str:
    """Names, sizes and modification times of a checkpoint folder's files: cheap, and it changes
    when the folder is rewritten (hashing the weights of a 7B model would not be cheap)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return stable_hash([(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def _remote_folder_signature(uri: str) -> str:
    """`_folder_signature` of a folder in object storage: names, sizes and ETags (or modification
    times), which change when it is rewritten; empty when it does not exist."""
    fs, root = url_to_fs(uri)
    if not fs.isdir(root):
        return ""
    files = fs.find(root, detail=True)
    return stable_hash(sorted(
        (name.removeprefix(root.rstrip("/") + "/"), info.get("size"), str(info.get("ETag") or info.get("LastModified") or info.get("mtime")))
        for name, info in files.items()
    ))


def resolve_models(
    workdir: Workdir, cfg: EvalConfig, base_model: str, base_revision: str | None = None
) -> tuple[list[EvalModel], list[str]]:
    """The models to score, in `eval.models` order, and a note per entry skipped. `base_revision`
    pins the base model (filter.revision); `eval.revision` pins the model ids of `eval.models`."""
    models, notes = [], []
    for entry in cfg.models:
        if entry == BASE:
            models.append(EvalModel(entry, base_model, model_identity(base_model, base_revision), base_revision))
        elif entry in TRAINING_STAGES:
            manifest = read_manifest(workdir, entry)
            if manifest is None or not workdir.exists(entry, MODEL_DIR):
                notes.append(f"{entry}: skipped, the {entry} stage has not produced {workdir.uri(entry, MODEL_DIR)} yet")
                continue
            models.append(EvalModel(entry, workdir.uri(entry, MODEL_DIR), output_identity(manifest)))
        elif not is_local_uri(entry):
            models.append(EvalModel(entry, entry, stable_hash({"ref": entry, "files": _remote_folder_signature(entry)})))
        elif not Path(entry).expanduser().exists():  # a model id
            models.append(EvalModel(entry, entry, model_identity(entry, cfg.revision), cfg.revision))
        else:
            folder = Path(entry).expanduser()
            identity = _folder_signature(folder) if folder.is_dir() else ""
            models.append(EvalModel(entry, str(folder.resolve()), stable_hash({"ref": entry, "files": identity})))
    return models, notes


def eval_id(model: str, num_frames: int, qa_id: str) -> str:
    return f"{model}::{num_frames:05d}::{qa_id}"


# ------------------------------------------------------------------------------------------------
# Answering and grading
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalRequest:
    qa_id: str
    prompt: VideoPrompt


class Answerer(Protocol):
    def answer(self, requests: Sequence[EvalRequest]) -> list[list[Generation]]:
        """`eval.samples` generations per request, in request order."""
        ...


@dataclass
class HFAnswerer:
    """transformers on this machine: `batch_size` questions per call, each call's videos through
    the vision tower once, all samples drawn from that encoding."""

    lm: HFVideoLM
    cfg: EvalConfig

    def answer(self, requests: Sequence[EvalRequest]) -> list[list[Generation]]:
        cfg = self.cfg
        sampled = cfg.samples > 1
        results: list[list[Generation]] = []
        for start in range(0, len(requests), cfg.batch_size):
            batch = requests[start : start + cfg.batch_size]
            encoded = self.lm.encode([r.prompt for r in batch])
            results += self.lm.generate_encoded(
                encoded, max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.samples,
                temperature=cfg.temperature if sampled else 0.0, top_p=cfg.top_p,
                seed=sampling_seed([r.qa_id for r in batch], cfg.seed) if sampled else None,
            )
        return results


def vote_key(g: Grade, question_type: str) -> str | None:
    """What two answers must share to count as the same answer; None for no answer."""
    if g.predicted is None:
        return None
    if question_type == MULTIPLE_CHOICE:
        return g.predicted
    return normalize_answer(g.predicted) or None


def majority(grades: Sequence[Grade], question_type: str) -> tuple[int, int] | None:
    """(index of the first sample giving the most frequent answer, how many gave it); ties go to
    the answer given first. None when no sample has an answer."""
    keys = [vote_key(g, question_type) for g in grades]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    winner, votes = counts.most_common(1)[0]  # stable: equal counts keep first-seen order
    return keys.index(winner), votes


def eval_row(
    model: EvalModel, payload: dict[str, Any], frames_used: int, generations: Sequence[Generation], grades: Sequence[Grade]
) -> dict[str, Any]:
    """One EVAL_ITEMS row from an item's samples and their grades (the judge's, where it decided)."""
    question_type = payload["question_type"]
    voted = majority(grades, question_type)
    chosen = voted[0] if voted else 0
    return {
        "eval_id": eval_id(model.label, payload["num_frames"], payload["qa_id"]),
        "model": model.label, "model_path": model.path, "qa_id": payload["qa_id"], "video_id": payload["video_id"],
        "category": payload["category"], "question_type": question_type, "num_frames": payload["num_frames"],
        "frames_used": frames_used, "samples": len(generations),
        "prediction": grades[chosen].predicted if voted else None,
        "correct": grades[chosen].correct if voted else False,
        "grader": grades[chosen].method,
        "votes": voted[1] if voted else 0,
        "n_correct": sum(g.correct for g in grades),
        "format_ok": grades[chosen].format_ok,
        "response": generations[chosen].text,
        "response_length": generations[chosen].tokens_out,
        "finished": generations[chosen].finished,
    }


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------
def summarize(rows: Sequence[dict[str, Any]], model_order: Sequence[str]) -> list[dict[str, Any]]:
    """EVAL_SUMMARY rows: per model (in `model_order`), frame count and category, then Overall."""
    cells: dict[tuple[str, int, str], list[bool]] = {}
    for r in rows:
        for category in (r["category"], OVERALL):
            cells.setdefault((r["model"], r["num_frames"], category), []).append(r["correct"])
    order = {m: i for i, m in enumerate(model_order)}
    out = []
    for model, num_frames in sorted({(m, f) for m, f, _ in cells}, key=lambda mf: (order.get(mf[0], len(order)), mf[0], mf[1])):
        categories = category_order(c for m, f, c in cells if (m, f) == (model, num_frames) and c != OVERALL)
        for category in [*categories, OVERALL]:
            verdicts = cells[(model, num_frames, category)]
            out.append({
                "model": model, "category": category, "num_frames": num_frames, "n": len(verdicts),
                "correct": sum(verdicts), "accuracy": sum(verdicts) / len(verdicts),
            })
    return out


PAIRED_COLUMNS = ["comparison", "frames", "questions", "difference", "right only", "verdict"]


def eval_markdown(
    summary: Sequence[dict[str, Any]], cfg: EvalConfig, notes: Sequence[str], failures: Sequence[Failure], judge: str | None = None,
    paired: Sequence[dict[str, str]] = (), chance: float | None = None,
) -> str:
    rows = accuracy_table(summary)
    columns = ["model", "frames", *category_order(r["category"] for r in summary if r["category"] != OVERALL), OVERALL]
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(f.error_kind for f in failures).items())) or "none"
    answering = "greedy" if cfg.samples == 1 else f"majority of {cfg.samples} samples (temperature {cfg.temperature:g})"
    grading = f"normalised matching calls wrong are decided by the LLM judge {judge}" if judge else "are graded by normalised matching"
    parts = [
        "# Evaluation",
        f"Eval split answered {answering} with at most {cfg.max_new_tokens} new tokens; frames per video: "
        f"{', '.join(map(str, cfg.frame_counts))} ({cfg.main_frames}: {cfg.video_inputs_text()}). Open-ended answers {grading}. "
        f"Failures: {kinds}. Cells: {CELL_FORMAT}.",
        *(["\n".join(f"- {note}" for note in notes)] if notes else []),
        *([f"Chance: an option drawn at random for every multiple-choice question, every open-ended one counted wrong, "
           f"scores {100 * chance:.1f}% overall."] if chance is not None else []),
        markdown_table(columns, [[r.get(c, "-") for c in columns] for r in rows]) if rows else "No eval items were answered.",
    ]
    if paired:
        parts.append(
            "Each model against the one before it, on the same questions: the difference in accuracy (points) with "
            "its paired 95 % interval; an interval that excludes 0 is a lead beyond the noise of this many questions."
        )
        parts.append(markdown_table(PAIRED_COLUMNS, [[r[c] for c in PAIRED_COLUMNS] for r in paired]))
    if summary:
        parts.append(f"![accuracy per category]({ACCURACY_PNG})")
    if len(cfg.frame_counts) > 1:
        parts.append(f"![accuracy versus frames]({FRAMES_PNG})")
    return "\n\n".join(parts) + "\n"


def write_eval_charts(workdir: Workdir, summary: Sequence[dict[str, Any]], num_frames: int) -> list[str]:
    """The evaluation charts under `<workdir>/report/`; returns the files written."""
    written = []
    for name, png in ((ACCURACY_PNG, accuracy_chart(summary, num_frames)), (FRAMES_PNG, frames_chart(summary, OVERALL))):
        if png is not None:
            written.append(write_report_file(workdir, name, png))
    return written


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------
class EvalStage(Stage):
    name = "eval"
    code_version = "2"  # 2: mRoPE positions as the checkpoint was trained (models.positions)
    inputs = ("filter",)  # plus sft / grpo when eval.models asks for them and they exist
    output = EVAL_ITEMS
    side_outputs = (EVAL_SUMMARY,)
    # Summary rows are made in finalize, so shards hold none; "model" only satisfies the engine's
    # rule that every output names a column to reuse rows by.
    item_columns = {EVAL_ITEMS.name: "eval_id", EVAL_SUMMARY.name: "model"}

    def __init__(self) -> None:
        self._answerers: OrderedDict[str, Answerer] = OrderedDict()
        self._prefetcher: Prefetcher | None = None
        self._lock = threading.Lock()

    def models(self, ctx: StageContext) -> tuple[list[EvalModel], list[str]]:
        return resolve_models(ctx.workdir, ctx.config.eval, ctx.config.filter.model, ctx.config.filter.revision)

    def input_fingerprints(self, ctx: StageContext) -> dict[str, str]:
        fingerprints = super().input_fingerprints(ctx)
        for model in self.models(ctx)[0]:
            if model.label in TRAINING_STAGES:
                fingerprints[model.label] = model.identity
        return fingerprints

    def settings(self, ctx: StageContext) -> dict[str, Any]:
        settings = super().settings(ctx)
        settings["num_frames"] = ctx.config.eval.main_frames  # the label of the section's own sampling (max_frames with fps)
        for key in SAMPLING_KEYS if settings["samples"] == 1 else ():
            settings.pop(key)
        models, notes = self.models(ctx)
        settings["models"] = [asdict(m) for m in models]
        settings["skipped"] = notes
        if ctx.config.judge.model:  # the judge's verdicts are part of the rows
            settings["judge"] = judge_identity(ctx.config.judge)
        return settings

    def shard_settings(self, ctx: StageContext) -> dict[str, Any]:
        settings = self.settings(ctx)
        return {key: settings[key] for key in ANSWER_SETTINGS if key in settings}

    def table_dir(self, ctx: StageContext, schema: TableSchema) -> str:
        if schema.name == EVAL_SUMMARY.name:
            return ctx.stage_path(self.name, SUMMARY_DIR)
        return super().table_dir(ctx, schema)

    def list_items(self, ctx: StageContext) -> list[WorkItem]:
        examples = eval_examples(read_stage_table(ctx.workdir, "filter", FILTER).to_pylist())
        models, notes = self.models(ctx)
        for note in notes:
            log.info("eval: %s", note)
        if not examples:
            log.warning("eval: the filter stage put no item in the eval split; nothing to score")
        items = []
        for model in models:
            for num_frames in ctx.config.eval.frame_counts:
                for example in examples:
                    payload = {**asdict(example), "model": model.label, "model_path": model.path, "num_frames": num_frames}
                    key = stable_hash({"item": payload, "model_identity": model.identity})
                    items.append(WorkItem(eval_id(model.label, num_frames, example.qa_id), key=key, payload=payload))
        return items

    def load_answerer(self, ctx: StageContext, model: EvalModel) -> Answerer:
        try:
            lm = HFVideoLM(
                local_model(model.path, model.identity), trust_remote_code=ctx.config.eval.trust_remote_code, revision=model.revision,
                budget=ctx.config.eval.video_budget(),
            )
        except Exception as exc:  # every item of this model would fail alike: stop with the reason
            raise StageError(f"eval: cannot load model {model.label!r} from {model.path}: {type(exc).__name__}: {exc}") from exc
        return HFAnswerer(lm, ctx.config.eval)

    def answerer(self, ctx: StageContext, model: EvalModel) -> Answerer:
        # Loaded once per stage run and shared by its shards; at most one model per concurrent
        # shard stays loaded (shards are ordered by model, so each model loads about once).
        with self._lock:
            if model.path not in self._answerers:
                while len(self._answerers) >= ctx.config.execution.shard_workers:
                    self._answerers.popitem(last=False)
                self._answerers[model.path] = self.load_answerer(ctx, model)
            self._answerers.move_to_end(model.path)
            return self._answerers[model.path]

    def prefetcher(self, ctx: StageContext) -> Prefetcher | None:
        """The frame readers shared by the shards of a run, closed by `finalize`; None with
        `eval.prefetch_workers` 0."""
        cfg = ctx.config.eval
        if not cfg.prefetch_workers:
            return None
        with self._lock:
            if self._prefetcher is None:
                self._prefetcher = Prefetcher(cfg.prefetch_workers, max(cfg.prefetch_depth, cfg.batch_size))
                self._prefetcher.start()
            return self._prefetcher

    def _answers(
        self, ctx: StageContext, model: EvalModel, num_frames: int, posable: list[WorkItem], failures: list[Failure]
    ) -> tuple[list[tuple[WorkItem, SampledFrames]], list[list[Generation]]]:
        """The items whose video was read, with its frames and their answers by `model`; failure rows
        for the others appended to `failures`."""
        cfg = ctx.config.eval
        sampling = cfg.sampling_at(num_frames)
        prefetcher = self.prefetcher(ctx)
        if prefetcher is None or not any(it.payload["video_uri"] for it in posable):  # read the whole shard, then answer it
            ready, unreadable = frames_by_video(posable, sampling)
            failures += unreadable
            return ready, (self.answerer(ctx, model).answer([self._request(it, f) for it, f in ready]) if ready else [])
        answerer = self.answerer(ctx, model)
        # Resized in the workers only for the model they are resized for.
        preprocess, budget = (answerer.lm.preprocess, cfg.video_budget()) if isinstance(answerer, HFAnswerer) else (None, None)
        pairs = iter_frames_by_video(posable, sampling, failures, prefetcher, preprocess, budget)
        # `batch_size` questions per call, the batches HFAnswerer would make of the whole group: the same seeds.
        return answer_in_batches(
            pairs, cfg.batch_size, lambda batch: answerer.answer([self._request(it, frames) for it, frames in batch]), prefetcher,
        )

    @staticmethod
    def _request(item: WorkItem, frames: SampledFrames) -> EvalRequest:
        return EvalRequest(item.payload["qa_id"], VideoPrompt(video_messages(item.payload["prompt"]), frames))

    def process_shard(self, ctx: StageContext, items: list[WorkItem]) -> ShardResult:
        models = {m.label: m for m in self.models(ctx)[0]}
        rows: list[dict[str, Any]] = []
        failures: list[Failure] = []
        for (label, num_frames), group in groupby(items, key=lambda it: (it.payload["model"], it.payload["num_frames"])):
            posable, bad = posable_items(list(group))
            failures += bad
            model = models[label]
            ready, generations = self._answers(ctx, model, num_frames, posable, failures)
            if not ready:
                continue
            keys = [AnswerKey.from_row(it.payload) for it, _ in ready]
            plain = [[grade(g.text, key) for g in gens] for key, gens in zip(keys, generations)]
            judge = ctx.config.judge
            graded: list[list[Grade] | BaseException] = judge_all(judge, list(zip(keys, plain))) if judge.model else list(plain)
            for (it, frames), gens, grades in zip(ready, generations, graded):
                if isinstance(grades, BaseException):
                    failures.append(judge_failure(self.name, it.item_id, grades))
                else:
                    rows.append(eval_row(model, it.payload, len(frames), gens, grades))
        return ShardResult({EVAL_ITEMS.name: EVAL_ITEMS.from_rows(rows)}, failures)

    def finalize(
        self, ctx: StageContext, tables: dict[str, pa.Table], failures: list[Failure]
    ) -> tuple[dict[str, pa.Table], list[Failure]]:
        cfg = ctx.config.eval
        check_judge_reached(self.name, failures, "judge" in set(tables[EVAL_ITEMS.name]["grader"].to_pylist()))
        models, notes = self.models(ctx)
        order = [m.label for m in models]
        verdicts = tables[EVAL_ITEMS.name].select(["model", "num_frames", "category", "qa_id", "correct"]).to_pylist()
        summary = summarize(verdicts, order)
        write_eval_charts(ctx.workdir, summary, cfg.main_frames)
        scored = {r["qa_id"] for r in verdicts}
        examples = [e for e in eval_examples(read_stage_table(ctx.workdir, "filter", FILTER).to_pylist()) if e.qa_id in scored]
        chance = chance_accuracy([len(e.options) if e.options else None for e in examples]) if examples else None
        markdown = eval_markdown(summary, cfg, notes, failures, ctx.config.judge.model, paired_comparisons(verdicts, order), chance)
        write_report_file(ctx.workdir, REPORT_FILE, markdown.encode())
        self._answerers.clear()  # the models are not needed any more: free their memory now
        with self._lock:
            if self._prefetcher is not None:
                self._prefetcher.close()
        return {EVAL_ITEMS.name: tables[EVAL_ITEMS.name], EVAL_SUMMARY.name: EVAL_SUMMARY.from_rows(summary)}, failures

    def report_markdown(self, ctx: StageContext, manifest: dict[str, Any]) -> str | None:
        data = read_report_file(ctx.workdir, REPORT_FILE)
        return inline_images(data.decode(), ctx.workdir) if data is not None else None

    def report_table(self, ctx: StageContext, manifest: dict[str, Any]) -> list[dict[str, str]]:
        """Accuracy per model, frame count and category, for a Prefect table artifact."""
        summary = read_stage_table(ctx.workdir, self.name, EVAL_SUMMARY, SUMMARY_DIR).to_pylist()
        return accuracy_table(summary)
