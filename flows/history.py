"""Retention for the run history of Prefect's ephemeral API (`lvr run` without PREFECT_API_URL).

A Prefect server prunes its database with its vacuum service (README, "Run history retention").
The ephemeral API that `lvr run` starts in-process runs no services, so its database
(`$PREFECT_HOME/prefect.db`) would grow by every run's flow runs, task runs, logs, artifacts and
events forever. After a run, `lvr run` applies the same vacuum once, with Prefect's own functions,
to that local database: top-level flow runs that ended before the retention cutoff go with their
subflows, task runs, logs and artifacts, and events older than the cutoff go too. Like the server's
vacuum it runs at most hourly (a stamp file next to the database): a retention counted in days loses
nothing by the wait, and a run then does not pay the ~2 s of loading Prefect's server code for it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from prefect.settings import (
    PREFECT_SERVER_EVENTS_RETENTION_PERIOD,
    PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD,
    get_current_settings,
    temporary_settings,
)

PRUNE_EVERY = timedelta(hours=1)
# Its modification time is when the local history was last pruned.
STAMP_NAME = "lvr-history-pruned"


@dataclass(frozen=True)
class Pruned:
    flow_runs_before: int
    flow_runs_after: int

    @property
    def deleted(self) -> int:
        return self.flow_runs_before - self.flow_runs_after


def prune_stamp() -> Path:
    return Path(get_current_settings().home).expanduser() / STAMP_NAME


def prune_due(stamp: Path, now: float, every: timedelta = PRUNE_EVERY) -> bool:
    """No prune yet, or the last one `every` ago or more (a stamp from the future counts as none)."""
    try:
        last = stamp.stat().st_mtime
    except FileNotFoundError:
        return True
    return not 0 <= now - last < every.total_seconds()


def prune_local_history_if_due(retention: timedelta) -> Pruned | None:
    """`prune_local_history` when the last prune is an hour old or more; None when it was not due."""
    stamp = prune_stamp()
    if not prune_due(stamp, time.time()):
        return None
    pruned = prune_local_history(retention)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    return pruned


def prune_local_history(retention: timedelta) -> Pruned:
    """Delete what ended more than `retention` ago from the local (ephemeral) Prefect database."""
    updates = {PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD: retention, PREFECT_SERVER_EVENTS_RETENTION_PERIOD: retention}
    with temporary_settings(updates=updates):
        return asyncio.run(_vacuum())


async def _vacuum() -> Pruned:
    # Prefect's server code, imported only when a prune is due (~2 s on 2 cores).
    from prefect.server.database import provide_database_interface
    from prefect.server.services.db_vacuum import vacuum_old_events, vacuum_old_flow_runs, vacuum_orphaned_artifacts, vacuum_orphaned_logs

    db = provide_database_interface()
    before = await _count(db)
    # Deleting a run sets its subflows' parent to none: they are top-level, and deleted, in a later
    # batch of the same loop. Logs and artifacts have no cascade: deleted by run id, then orphans.
    await vacuum_old_flow_runs(db=db)
    await vacuum_orphaned_logs(db=db)
    await vacuum_orphaned_artifacts(db=db)
    await vacuum_old_events(db=db)
    return Pruned(before, await _count(db))


async def _count(db) -> int:
    from prefect.server.models.flow_runs import count_flow_runs

    async with db.session_context() as session:
        return await count_flow_runs(session=session)
