"""Markdown pages and their files under `<workdir>/report/` (shared by the stages that report).

Files go through the workdir's filesystem, so a report lands next to the data also in object
storage. `inline_images` turns a report's image links into data URIs for places that cannot reach
the files (a Prefect markdown artifact).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

from tasks.engine.store import Workdir, write_bytes_atomic

REPORT_DIR = "report"
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def write_report_file(workdir: Workdir, name: str, data: bytes) -> str:
    path = workdir.path(REPORT_DIR, name)
    write_bytes_atomic(workdir.fs, path, data)
    return path


def read_report_file(workdir: Workdir, name: str) -> bytes | None:
    try:
        with workdir.fs.open(workdir.path(REPORT_DIR, name), "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def inline_images(markdown: str, workdir: Workdir) -> str:
    """Replace `![alt](name.png)` links to files of the report folder by data URIs."""

    def embed(match: re.Match[str]) -> str:
        data = read_report_file(workdir, match.group(2))
        if data is None:
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(data).decode()})"

    return _IMAGE_LINK.sub(embed, markdown)


def md_text(text: str, limit: int = 240) -> str:
    """Model output made safe for one markdown table cell or list item: one line, no pipes, bounded."""
    flat = " ".join(_CONTROL.sub(" ", text).split()).replace("|", "\\|").replace("`", "'")
    return flat if len(flat) <= limit else flat[: limit - 1] + "\u2026"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
