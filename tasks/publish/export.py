"""`export_workdir`: the publish folder of a workdir.

    <out>/dataset/README.md                       dataset card (front matter declares the splits)
    <out>/dataset/data/<split>-00000-of-00001.parquet   sft, rl, eval (FILTER rows)
    <out>/models/<stage>/README.md                model card, for each trained model (sft, grpo)
    <out>/models/<stage>/...                      the model's save_pretrained files

Everything is built in a temporary folder under `<out>` and then replaces `<out>/dataset` and
`<out>/models` as a whole, so a model no longer in the workdir leaves no stale copy behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasks.engine.store import Workdir
from tasks.publish.cards import dataset_card, model_card
from tasks.publish.dataset import DATASET_STAGE, DatasetFiles, write_dataset_files
from tasks.publish.models import (
    EvalResults,
    TrainedModel,
    copy_model,
    eval_results,
    trained_models,
)
from tasks.publish.provenance import PublishError, provenance_through

DATASET_DIR = "dataset"
MODELS_DIR = "models"
CARD = "README.md"


@dataclass(frozen=True)
class Export:
    out: Path
    data: DatasetFiles
    models: tuple[TrainedModel, ...]
    eval: EvalResults

    @property
    def dataset_dir(self) -> Path:
        return self.out / DATASET_DIR

    def model_dir(self, stage: str) -> Path:
        return self.out / MODELS_DIR / stage


def export_workdir(workdir: str | Workdir, out: str | os.PathLike[str], repo: str | None = None) -> Export:
    """Write the dataset folder and one folder per trained model under `out`. `repo`: the dataset's
    Hub id when it is to be pushed (named in the cards; the models go to `<repo>-<stage>`)."""
    wd = workdir if isinstance(workdir, Workdir) else Workdir(str(workdir))
    if not wd.exists():
        raise PublishError(f"no workdir at {wd.uri()}")
    root = Path(out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".lvr-publish-", dir=root))
    try:
        data = write_dataset_files(wd, staging / DATASET_DIR)
        (staging / DATASET_DIR / CARD).write_text(dataset_card(data, provenance_through(wd, DATASET_STAGE), repo))
        models = trained_models(wd)
        results = eval_results(wd, models)
        for model in models:
            folder = staging / MODELS_DIR / model.stage
            copy_model(wd, model, folder)
            (folder / CARD).write_text(model_card(model, data.counts, results, repo))
        for name in (DATASET_DIR, MODELS_DIR):
            target = root / name
            if target.exists():
                shutil.rmtree(target)
            if (staging / name).exists():
                os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Export(root, data, tuple(models), results)
