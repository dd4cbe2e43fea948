"""Uploading a publish folder to the Hugging Face Hub: the dataset to a dataset repo `<repo>`, each
model to a model repo `<repo>-<stage>`. `upload_plan` and `format_plan` contact nothing (what
`--dry-run` shows); only `push` does, and each repo then mirrors its folder (remote files the folder
no longer has are deleted, so a retrained model leaves no stale weight shard behind)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tasks.publish.export import Export
from tasks.publish.provenance import PublishError

TOKEN_VARIABLE = "HF_TOKEN"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Upload:
    repo_id: str
    repo_type: str  # "dataset" or "model"
    folder: Path
    files: tuple[tuple[str, int], ...]  # (path in the repo, bytes)

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{'datasets/' if self.repo_type == 'dataset' else ''}{self.repo_id}"

    @property
    def size(self) -> int:
        return sum(size for _, size in self.files)


def check_repo_id(repo: str) -> str:
    if not _REPO_ID.match(repo) or ".." in repo or repo.endswith((".git", ".")):
        raise PublishError(f"--repo {repo!r} is not a Hub repo id: write it as org/name (or user/name)")
    return repo


def folder_files(folder: Path) -> tuple[tuple[str, int], ...]:
    return tuple((p.relative_to(folder).as_posix(), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file())


def upload_plan(export: Export, repo: str) -> list[Upload]:
    check_repo_id(repo)
    uploads = [Upload(repo, "dataset", export.dataset_dir, folder_files(export.dataset_dir))]
    for model in export.models:
        folder = export.model_dir(model.stage)
        uploads.append(Upload(f"{repo}-{model.stage}", "model", folder, folder_files(folder)))
    return uploads


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def format_plan(uploads: list[Upload]) -> str:
    lines = []
    for u in uploads:
        lines.append(f"{u.repo_type} repo {u.repo_id} ({u.url}) from {u.folder}: {len(u.files)} files, {human_size(u.size)}")
        lines += [f"  {size:>14,} B  {path}" for path, size in u.files]
    return "\n".join(lines)


def hub_token() -> str | None:
    """HF_TOKEN, else the token `hf auth login` stored. Never printed or written anywhere."""
    token = os.environ.get(TOKEN_VARIABLE)
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def push(uploads: list[Upload], token: str, private: bool = False) -> list[str]:
    """Create each repo if needed and upload its folder as one commit; returns the commit URLs."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    commits = []
    for u in uploads:
        api.create_repo(u.repo_id, repo_type=u.repo_type, private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(u.folder), repo_id=u.repo_id, repo_type=u.repo_type, delete_patterns=["*"],
            commit_message=f"lvr publish: {len(u.files)} files",
        )
        commits.append(str(getattr(info, "commit_url", info)))
    return commits
