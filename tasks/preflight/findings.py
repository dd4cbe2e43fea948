"""What a preflight check says: findings that name the config key, its value and a valid alternative."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem of a config: `key` is the dotted config key to change (or the environment variable)."""

    stage: str | None
    key: str
    message: str
    severity: Severity = "error"

    def line(self) -> str:
        where = f"[{self.stage}] " if self.stage else ""
        return f"{self.severity}: {where}{self.key}: {self.message}"


class PreflightError(ValueError):
    """A config that `lvr check` refuses: raised before any stage starts, with every error found."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("the config fails lvr check:\n" + "\n".join(f.line() for f in findings))
