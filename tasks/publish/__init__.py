"""Publishing a workdir: the dataset as an upload-ready Hugging Face `datasets` folder, each trained
model with a model card, and the upload of those folders to the Hub (`lvr publish`).

Cards are built from the workdir's tables and manifests only, so every number a card states is one
the workdir holds. No Prefect; nothing here contacts the network except `hub.push`."""

from tasks.publish.export import Export, export_workdir
from tasks.publish.hub import (
    Upload,
    check_repo_id,
    format_plan,
    hub_token,
    push,
    upload_plan,
)
from tasks.publish.provenance import PublishError

__all__ = ["Export", "PublishError", "Upload", "check_repo_id", "export_workdir", "format_plan", "hub_token", "push", "upload_plan"]
