"""The dataset card and the model cards: Hub README.md files (YAML front matter, then Markdown),
every number taken from the workdir's tables and manifests."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import yaml

from data_schemas import DIFFICULTIES, FILTER, UNUSED_SPLIT
from tasks.config import is_model_id
from tasks.grading.prompts import category_order
from tasks.publish.dataset import PUBLISHED_SPLITS, DatasetCounts, DatasetFiles
from tasks.publish.models import EvalResults, TrainedModel
from tasks.publish.provenance import StageProvenance
from tasks.report.accuracy import CELL_FORMAT, OVERALL, accuracy_table
from tasks.report.markdown import markdown_table, md_text

SPLIT_USES = {"sft": "chain-of-thought SFT", "rl": "GRPO (reinforcement learning)", "eval": "held-out evaluation"}
CODE_LICENSE = "Apache-2.0"
LICENSE_NOTE = (
    f"The code that produced this ({CODE_LICENSE}) is lvr, the LongVILA-R1 long-video reasoning recipe. "
    "The videos are not part of this repository and keep their own licenses: check the terms of every "
    "source before using or redistributing them, and the frames or clips cut from them."
)


def front_matter(meta: Mapping[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(dict(meta), sort_keys=False, allow_unicode=True) + "---\n"


def size_category(n: int) -> str:
    """The Hub's `size_categories` bucket of a row count."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def _count_table(label: str, keys: list[str], per_split: Mapping[str, Mapping[str, int]], splits: Iterable[str]) -> str:
    splits = list(splits)
    rows = []
    for key in keys:
        counts = [per_split.get(s, {}).get(key, 0) for s in splits]
        rows.append([md_text(key), *counts, sum(counts)])
    totals = [sum(per_split.get(s, {}).values()) for s in splits]
    rows.append(["**total**", *totals, sum(totals)])
    return markdown_table([label, *splits, "total"], rows)


def counts_section(counts: DatasetCounts, splits: Iterable[str] = PUBLISHED_SPLITS) -> str:
    splits = list(splits)
    categories = category_order(c for s in splits for c in counts.by_category.get(s, {}))
    difficulties = [d for d in DIFFICULTIES if any(d in counts.by_difficulty.get(s, {}) for s in splits)]
    difficulties += sorted({d for s in splits for d in counts.by_difficulty.get(s, {})} - set(DIFFICULTIES))
    return "\n\n".join([
        "### Questions per category\n\n" + _count_table("category", categories, counts.by_category, splits),
        "### Questions per difficulty\n\n" + _count_table("difficulty", difficulties, counts.by_difficulty, splits),
    ])


def provenance_section(stages: list[StageProvenance]) -> str:
    table = markdown_table(
        ["stage", "rows", "fingerprint", "code version", "lvr version"],
        [[p.stage, p.rows, f"`{p.fingerprint}`", p.code_version, p.lvr_version] for p in stages],
    )
    configs = [
        f"<details><summary>{p.stage} settings</summary>\n\n```yaml\n"
        + yaml.safe_dump(json.loads(json.dumps(p.config, default=str)), sort_keys=True, allow_unicode=True)
        + "```\n\n</details>"
        for p in stages
    ]
    return "\n\n".join([table, *configs])


def difficulty_note(filter_settings: Mapping[str, Any]) -> str:
    """How difficulty was labelled, with the thresholds of the filter stage's settings when it recorded them,
    and the LLM judge that graded open-ended answers if there was one."""
    text = "Difficulty comes from the pass rate of the base model's `n_runs` answers to each question"
    easy, hard = filter_settings.get("easy_min_pass_rate"), filter_settings.get("hard_max_pass_rate")
    text += "." if easy is None or hard is None else f": easy at a pass rate of at least {easy}, hard at most {hard}, medium in between."
    judge = (filter_settings.get("judge") or {}).get("model")
    if judge:
        text += f" Open-ended answers that normalised matching called wrong were decided by the LLM judge `{judge}`."
    return text


def _type_name(type_: pa.DataType) -> str:
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return f"list of {_type_name(type_.value_type)}"
    return "string" if type_ in (pa.string(), pa.large_string()) else str(type_)


def column_docs() -> str:
    rows = []
    for field in FILTER.schema:
        doc = (field.metadata or {}).get(b"doc", b"").decode()
        rows.append([f"`{field.name}`", _type_name(field.type), md_text(doc).replace("<", "&lt;").replace(">", "&gt;")])
    return markdown_table(["column", "type", "meaning"], rows)


DEFAULT_TITLE = "lvr long-video reasoning dataset"


def dataset_card(data: DatasetFiles, stages: list[StageProvenance], repo: str | None) -> str:
    """`repo`: the dataset's Hub id when it is to be pushed (the card's title and loading example)."""
    counts = data.counts
    name = repo or DEFAULT_TITLE
    meta = {
        "pretty_name": name,
        "license": CODE_LICENSE.lower(),
        "task_categories": ["video-text-to-text"],
        "tags": ["video", "long-video", "reasoning", "chain-of-thought", "lvr"],
        "size_categories": [size_category(counts.published_rows)],
        "configs": [{"config_name": "default", "data_files": [{"split": s, "path": p} for s, p in data.files.items()]}],
    }
    split_rows = [[s, counts.per_split[s], SPLIT_USES[s] + ("" if s in data.files else " (no rows: not included)")] for s in PUBLISHED_SPLITS]
    filter_rows = data.manifest["rows"]
    sections = [
        front_matter(meta),
        (
            f"# {name}\n\nLong-video reasoning questions with chain-of-thought answers, built by lvr (the LongVILA-R1 "
            "recipe): videos cut into clips, each clip captioned, questions with reasoning written over all captions of a "
            "video, then answered by a base model to label difficulty and assign splits."
        ),
        "## Splits\n\n" + markdown_table(["split", "questions", "used for"], split_rows)
        + f"\n\nThe filter table holds {filter_rows} questions (its manifest's row count); "
        f"{counts.per_split.get(UNUSED_SPLIT, 0)} of them are in the `{UNUSED_SPLIT}` split and not published, "
        f"{counts.published_rows} are.",
        "## Counts\n\n" + counts_section(counts)
        + "\n\n" + difficulty_note(data.manifest.get("config") or {}),
        (
            "## Loading\n\n```python\nfrom datasets import load_dataset\n\n"
            f"ds = load_dataset({(repo or 'path/to/dataset')!r})  # or the folder this card is in\n"
            f"ds[{next(iter(data.files), 'sft')!r}][0]\n```"
        ),
        (
            "## Videos\n\nThe videos are referenced, not copied: the `video_uri` column holds the absolute path or URL of "
            "each question's source video, and models sample their frames across the whole video. "
            f"The published questions refer to {data.videos} distinct videos, {data.local_videos} of them by a local "
            "path on the machine that built the dataset: to train or evaluate elsewhere, put the videos at those paths "
            "or rewrite the column."
        ),
        "## Columns\n\n" + column_docs(),
        "## How it was made\n\nEach stage's manifest: the fingerprint of its output (a hash of its settings, its "
        "inputs' fingerprints and its code version), the code and lvr versions, and the settings.\n\n"
        + provenance_section(stages),
        "## License\n\n" + LICENSE_NOTE,
    ]
    return "\n\n".join(s.strip("\n") for s in sections) + "\n"


def eval_section(model: TrainedModel, results: EvalResults) -> str:
    if results.provenance is None:
        return "Not evaluated: run the eval stage (`lvr run --workdir W --from eval`)."
    if model.stage in results.stale:
        note = (f"Eval answered with an older `{model.stage}` model than this one, so its rows are left out; "
                "rerun the eval stage for this model's accuracy.")
    elif not any(r["model"] == model.stage for r in results.rows):
        note = f"The eval stage did not evaluate this model (`eval.models` lacks `{model.stage}`)."
    else:
        note = f"This model is `{model.stage}`; `base` is the model the dataset was filtered with."
    table = accuracy_table(results.rows)
    if not table:
        return note
    categories = category_order(r["category"] for r in results.rows if r["category"] != OVERALL) + [OVERALL]
    rows = [[md_text(r["model"]), r["frames"], *(r.get(c, "") for c in categories)] for r in table]
    return (
        f"Accuracy on the eval split per reasoning category, {CELL_FORMAT} (eval/_summary):\n\n"
        + markdown_table(["model", "frames", *categories], rows) + "\n\n" + note
    )


def model_card(model: TrainedModel, counts: DatasetCounts, results: EvalResults, repo: str | None) -> str:
    """`repo`: the dataset's Hub id when it is pushed too (this model is `<repo>-<stage>`)."""
    base = model.base_model
    dataset = repo or DEFAULT_TITLE
    title = f"{repo}-{model.stage}" if repo else f"lvr {model.stage} model"
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "video-text-to-text",
        "tags": ["video", "long-video", "reasoning", "lvr", model.stage],
    }
    if model.base_stage is not None and repo:
        meta["base_model"] = f"{repo}-{model.base_stage}"
    elif is_model_id(base):
        meta["base_model"] = base  # a hub id; a local folder is named in the text only
    if repo:
        meta["datasets"] = [repo]
    split = model.split
    revision = f" at revision `{model.base_revision}`" if model.base_revision else ""
    if split is not None:
        data = (
            f"The `{split}` split of `{dataset}`: {counts.per_split.get(split, 0)} questions.\n\n"
            + counts_section(counts, [split])
        )
    else:
        data = f"`{dataset}`, as the `{model.stage}` stage's settings below select."
    sections = [
        front_matter(meta),
        (
            f"# {title}\n\nA long-video reasoning model trained by the `{model.stage}` stage of lvr "
            "(the LongVILA-R1 recipe). It answers as `<think>reasoning</think><answer>answer</answer>`."
        ),
        f"## Base model\n\n`{base}`{revision}" + (
            f": the `{model.base_stage}` model of the same run"
            + (f", published as `{repo}-{model.base_stage}`." if repo else ".") if model.base_stage else "."
        ),
        "## Training data\n\n" + data,
        "## Training settings\n\n"
        + markdown_table(["setting", "value"], [[f"`{k}`", md_text(json.dumps(v, default=str))] for k, v in sorted(model.provenance.config.items())])
        + f"\n\nStage fingerprint `{model.provenance.fingerprint}`, code version {model.provenance.code_version}, "
        f"lvr {model.provenance.lvr_version}.",
        "## Evaluation\n\n" + eval_section(model, results),
        "## License\n\n" + LICENSE_NOTE + " The weights derive from the base model and are subject to its license.",
    ]
    return "\n\n".join(s.strip("\n") for s in sections) + "\n"
