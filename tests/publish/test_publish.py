"""`lvr publish`: a workdir (filter, sft and grpo with a real model folder, eval) made by stand-ins
through the real engine, published as a `datasets` folder and model folders whose cards state the
workdir's own numbers; the Hub side only as far as it runs without a Hub (dry run, missing token)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest
import yaml

from data_schemas import EVAL_ITEMS, EVAL_SUMMARY, FILTER, SPLITS, TRAIN_METRICS
from flows import cli
from models.tiny import ensure_tiny_model
from tasks.config import load_config
from tasks.engine.manifest import output_identity, read_manifest
from tasks.engine.run import run_stage
from tasks.engine.stage import ShardResult, StageContext
from tasks.engine.store import Workdir, stable_hash
from tasks.publish import PublishError, export_workdir
from tasks.report.accuracy import accuracy_table
from tests.support.eval_workdir import filter_row, sft_metrics
from tests.support.paths import run_cli
from tests.support.stand_ins import Published

LOCAL_A, LOCAL_B, REMOTE = "/data/videos/a.mp4", "/data/videos/b.mp4", "s3://lvr-videos/c.mp4"
# (qa_id, video, category, split, difficulty)
ITEMS = [
    ("s0", LOCAL_A, "Temporal", "sft", "easy"), ("s1", LOCAL_B, "Temporal", "sft", "medium"),
    ("s2", REMOTE, "Spatial", "sft", "medium"),
    ("r0", LOCAL_A, "Plot and Narrative", "rl", "medium"), ("r1", REMOTE, "Plot and Narrative", "rl", "hard"),
    ("r2", LOCAL_B, "Goal and Purpose", "rl", "medium"), ("r3", LOCAL_A, "Temporal", "rl", "medium"),
    ("e0", LOCAL_A, "Temporal", "eval", "hard"), ("e1", LOCAL_B, "Temporal", "eval", "easy"),
    ("e2", REMOTE, "Spatial", "eval", "medium"),
    ("u0", LOCAL_A, "Spatial", "unused", "easy"), ("u1", LOCAL_B, "Temporal", "unused", "easy"),
]


def filter_rows() -> list[dict[str, Any]]:
    rows = []
    for qa_id, uri, category, split, difficulty in ITEMS:
        row = filter_row(qa_id, Path(uri).stem, uri, category, "multiple_choice", "B", split=split)
        rows.append(row | {"difficulty": difficulty})
    return rows


def summary_rows(model: str, temporal_correct: int) -> list[dict[str, Any]]:
    cells = [("Temporal", 2, temporal_correct), ("Spatial", 1, 1), ("Overall", 3, temporal_correct + 1)]
    return [{"model": model, "category": c, "num_frames": 4, "n": n, "correct": k, "accuracy": k / n} for c, n, k in cells]


class PublishedWithSettings(Published):
    """A stand-in whose manifest records the stage's real config section, as the stage's own does."""

    def __init__(self, name: str, schema, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        super().__init__(name, schema, rows)
        self.extra = extra or {}

    def settings(self, ctx):
        return {**getattr(ctx.config, self.name).output_settings(), **self.extra, "rows": stable_hash(self.rows)}


class PublishedEval(Published):
    """The eval stage's outputs: no items, a summary in eval/_summary, and the model identities it
    answered with as input fingerprints (the current sft model; an older grpo model)."""

    side_outputs = (EVAL_SUMMARY,)

    def __init__(self, summary: list[dict[str, Any]], fingerprints: dict[str, str]) -> None:
        super().__init__("eval", EVAL_ITEMS, [])
        self.summary, self.fingerprints = summary, fingerprints

    def input_fingerprints(self, ctx):
        return self.fingerprints

    def table_dir(self, ctx, schema):
        return ctx.stage_path("eval", "_summary") if schema is EVAL_SUMMARY else super().table_dir(ctx, schema)

    def process_shard(self, ctx, items):
        return ShardResult({EVAL_ITEMS.name: EVAL_ITEMS.empty(), EVAL_SUMMARY.name: EVAL_SUMMARY.from_rows(self.summary)}, [])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("publish") / "wd"
    ctx = StageContext(Workdir(str(root)), load_config("tiny"))
    run_stage(PublishedWithSettings("filter", FILTER, filter_rows()), ctx)
    tiny = ensure_tiny_model()
    run_stage(PublishedWithSettings("sft", TRAIN_METRICS, sft_metrics()), ctx)
    shutil.copytree(tiny, root / "sft" / "model")
    init = {"init_model": {"path": str(root / "sft" / "model"), "identity": "x"}}
    run_stage(PublishedWithSettings("grpo", TRAIN_METRICS, sft_metrics(), init), ctx)
    shutil.copytree(tiny, root / "grpo" / "model")
    summary = summary_rows("base", 0) + summary_rows("sft", 1) + summary_rows("grpo", 2)
    sft_identity = output_identity(read_manifest(ctx.workdir, "sft"))
    run_stage(PublishedEval(summary, {"filter": "f", "sft": sft_identity, "grpo": "an-older-grpo-model"}), ctx)
    return root


@pytest.fixture(scope="module")
def published(workdir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "hub"
    result = run_cli("publish", str(workdir), "--out", str(out), env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert f"dataset: {out / 'dataset'} (sft 3, rl 4, eval 3)" in result.stdout
    return out


def card_parts(path: Path) -> tuple[dict[str, Any], str]:
    _, meta, body = path.read_text().split("---\n", 2)
    return yaml.safe_load(meta), body


def markdown_tables(body: str, heading: str) -> dict[str, list[str]]:
    """The table under `heading`: first cell -> the other cells."""
    section = body.split(heading, 1)[1].split("\n\n", 2)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    return {r[0]: r[1:] for r in rows[2:]} | {"header": rows[0][1:]}


def test_publish_folder_loads_with_datasets_split_by_split(published, tmp_path):
    ds = datasets.load_dataset(str(published / "dataset"), cache_dir=str(tmp_path / "hf-cache"))
    assert set(ds) == {"sft", "rl", "eval"}
    expected = {split: sorted(q for q, _, _, s, _ in ITEMS if s == split) for split in ("sft", "rl", "eval")}
    assert {split: sorted(ds[split]["qa_id"]) for split in ds} == expected
    assert ds["sft"].column_names == FILTER.columns
    row = next(r for r in ds["rl"] if r["qa_id"] == "r1")
    assert row["video_uri"] == REMOTE and row["difficulty"] == "hard" and row["options"][0] == "the red car"
    assert sorted(p.name for p in (published / "dataset" / "data").iterdir()) == [
        "eval-00000-of-00001.parquet", "rl-00000-of-00001.parquet", "sft-00000-of-00001.parquet"]


def test_dataset_card_counts_and_versions_are_the_workdirs(published, workdir):
    meta, body = card_parts(published / "dataset" / "README.md")
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": s, "path": f"data/{s}-00000-of-00001.parquet"} for s in ("sft", "rl", "eval")]}]
    assert meta["license"] == "apache-2.0" and meta["size_categories"] == ["n<1K"]

    table = pd.read_parquet(workdir / "filter")
    manifest = read_manifest(Workdir(str(workdir)), "filter")
    published_rows = table[table.split != "unused"]
    for heading, column in (("### Questions per category", "category"), ("### Questions per difficulty", "difficulty")):
        cells = markdown_tables(body, heading)
        assert cells.pop("header") == ["sft", "rl", "eval", "total"]
        totals = cells.pop("**total**")
        counts = published_rows.groupby([column, "split"]).size()
        assert set(cells) == set(published_rows[column])
        for key, values in cells.items():
            assert [int(v) for v in values] == [int(counts.get((key, s), 0)) for s in ("sft", "rl", "eval")] + [
                int((published_rows[column] == key).sum())]
        assert [int(v) for v in totals] == [3, 4, 3, 10]
    splits = markdown_tables(body, "## Splits")
    assert {s: int(splits[s][0]) for s in ("sft", "rl", "eval")} == published_rows.split.value_counts().to_dict()
    assert f"The filter table holds {manifest['rows']} questions" in body and manifest["rows"] == len(table) == 12
    assert "2 of them are in the `unused` split and not published, 10 are" in body
    # Provenance: every manifest of the dataset's stages (here only filter; no clip/caption/qa ran).
    assert f"| filter | 12 | `{manifest['fingerprint']}` | {manifest['code_version']} | {manifest['lvr_version']} |" in body
    assert "| sft |" not in body.split("## How it was made")[1] and "easy_min_pass_rate: 1.0" in body
    assert "easy at a pass rate of at least 1.0, hard at most 0.0" in body
    assert "`video_uri`" in body and "3 distinct videos, 2 of them by a local path" in body
    assert "Apache-2.0" in body and "keep their own licenses" in body


def test_model_cards_hold_the_eval_table_of_the_current_models_only(published, workdir):
    wd = Workdir(str(workdir))
    tiny = ensure_tiny_model()
    for stage in ("sft", "grpo"):
        folder = published / "models" / stage
        assert (folder / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
        assert not (folder / ".lvr_complete").exists()
        assert {p.name for p in folder.iterdir()} == {p.name for p in tiny.iterdir() if not p.name.startswith(".")} | {"README.md"}

    summary = pd.read_parquet(workdir / "eval" / "_summary").to_dict("records")
    rows = {r["model"]: r for r in accuracy_table(summary)}
    meta, sft_card = card_parts(published / "models" / "sft" / "README.md")
    assert "base_model" not in meta  # 'tiny' is no hub id
    assert "| base | 4 | 0.0% (0/2) [0.0, 65.8] | 100.0% (1/1) [20.7, 100.0] | 33.3% (1/3) [6.1, 79.2] |" in sft_card
    assert f"| sft | 4 | {rows['sft']['Temporal']} | {rows['sft']['Spatial']} | {rows['sft']['Overall']} |" in sft_card
    assert "| grpo |" not in sft_card  # eval answered with an older grpo model
    sft_manifest = read_manifest(wd, "sft")
    assert f"| `learning_rate` | {sft_manifest['config']['learning_rate']} |" in sft_card
    assert sft_manifest["fingerprint"] in sft_card and "The `sft` split of `lvr long-video reasoning dataset`: 3 questions." in sft_card

    _, grpo_card = card_parts(published / "models" / "grpo" / "README.md")
    assert "| grpo |" not in grpo_card and "older `grpo` model" in grpo_card and "| sft | 4 |" in grpo_card
    base = grpo_card.split("## Base model")[1].split("##")[0]
    assert f"`{workdir / 'sft' / 'model'}`: the `sft` model of the same run." in base
    assert "The `rl` split" in grpo_card and ": 4 questions." in grpo_card


def test_dry_run_lists_every_file_with_its_size_and_connects_nowhere(workdir, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError(f"lvr publish --dry-run opened a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert cli.main(["publish", str(workdir), "--out", str(out), "--repo", "org/name", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for repo, repo_type, folder in (("org/name", "dataset", out / "dataset"), ("org/name-sft", "model", out / "models" / "sft"),
                                    ("org/name-grpo", "model", out / "models" / "grpo")):
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        assert f"{repo_type} repo {repo} (" in printed and f"from {folder}: {len(files)} files" in printed
        for path in files:
            assert f"  {path.stat().st_size:>14,} B  {path.relative_to(folder).as_posix()}\n" in printed + "\n"
    # With --repo the cards name the repos.
    meta, _ = card_parts(out / "models" / "sft" / "README.md")
    assert meta["datasets"] == ["org/name"] and "base_model" not in meta
    meta, grpo_card = card_parts(out / "models" / "grpo" / "README.md")
    assert meta["base_model"] == "org/name-sft" and "published as `org/name-sft`" in grpo_card
    assert "load_dataset('org/name')" in (out / "dataset" / "README.md").read_text()


def test_repo_without_a_token_exits_2_naming_HF_TOKEN_before_writing(workdir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("publish", str(workdir), "--out", str(out), "--repo", "org/name",
                     env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "HF_TOKEN" in result.stderr and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--repo", "not a repo"], "not a Hub repo id"),
    (["--dry-run"], "--dry-run lists an upload"),
])
def test_bad_repo_arguments_exit_2(workdir, tmp_path, capsys, argv, message):
    assert cli.main(["publish", str(workdir), "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_workdir_without_a_complete_filter_or_with_a_changed_table_is_refused(workdir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PublishError, match="run the pipeline through filter"):
        export_workdir(str(empty), tmp_path / "out")
    changed = tmp_path / "changed"
    shutil.copytree(workdir / "filter", changed / "filter")
    export_workdir(str(changed), tmp_path / "out")  # a copy of the same filter/: still fine
    manifest = (changed / "filter" / "_manifest.json")
    manifest.write_text(manifest.read_text().replace('"rows": 12', '"rows": 13'))
    with pytest.raises(PublishError, match="holds 12 rows but its manifest says 13"):
        export_workdir(str(changed), tmp_path / "out")


def test_republishing_replaces_the_folders_and_drops_a_model_that_is_gone(workdir, tmp_path):
    copy = tmp_path / "wd"
    shutil.copytree(workdir, copy)
    out = tmp_path / "out"
    first = export_workdir(str(copy), out)
    assert [m.stage for m in first.models] == ["sft", "grpo"]
    shutil.rmtree(copy / "grpo")
    second = export_workdir(str(copy), out)
    assert [m.stage for m in second.models] == ["sft"] and sorted(p.name for p in (out / "models").iterdir()) == ["sft"]
    assert not [p for p in out.iterdir() if p.name.startswith(".lvr-publish-")]
    assert set(SPLITS) >= set(second.data.files)


def test_the_dataset_card_names_the_judge_that_graded_open_ended_answers():
    from tasks.publish.cards import difficulty_note

    thresholds = {"easy_min_pass_rate": 1.0, "hard_max_pass_rate": 0.0}
    judged = difficulty_note({**thresholds, "judge": {"model": "deepseek-reasoner", "prompt": "0123abcd"}})
    assert "hard at most 0.0, medium in between. Open-ended answers" in judged and "the LLM judge `deepseek-reasoner`" in judged
    assert "judge" not in difficulty_note(thresholds)
