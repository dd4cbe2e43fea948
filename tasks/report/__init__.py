"""The run report: `<workdir>/report/index.html` with charts, built from the workdir alone, and
the progress reporting people see while a stage runs."""

from tasks.report.build import build_report, update_report

__all__ = ["build_report", "update_report"]
