"""Retention for the run history of Prefect's ephemeral API (`lvr run` without PREFECT_API_URL).

A Prefect server prunes its database with its vacuum service (README, "Run history retention").
The ephemeral API that `lvr run` starts in-process runs no services, so its database
(`$PREFECT_HOME/prefect.db`) would grow by every run's flow runs, task runs, logs, artifacts and
events forever. After a run, `lvr run` applies the same vacuum once, with Prefect's own functions,
to that local database: top-level flow runs that ended before the retention cutoff go with their
subflows, task runs, logs and artifacts, and events older than the cutoff go too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from prefect.server.database import provide_database_interface
from prefect.server.models.flow_runs import count_flow_runs
from prefect.server.services.db_vacuum import vacuum_old_events, vacuum_old_flow_runs, vacuum_orphaned_artifacts, vacuum_orphaned_logs
from prefect.settings import (
    PREFECT_SERVER_EVENTS_RETENTION_PERIOD,
    PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD,
    get_current_settings,
    temporary_settings,
)


@dataclass(frozen=True)
class Pruned:
    flow_runs_before: int
    flow_runs_after: int

    @property
    def deleted(self) -> int:
        return self.flow_runs_before - self.flow_runs_after


def uses_ephemeral_api() -> bool:
    """No PREFECT_API_URL: flows run against a database of this machine that no server vacuums."""
    return get_current_settings().api.url is None


def prune_local_history(retention: timedelta) -> Pruned:
    """Delete what ended more than `retention` ago from the local (ephemeral) Prefect database."""
    updates = {PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD: retention, PREFECT_SERVER_EVENTS_RETENTION_PERIOD: retention}
    with temporary_settings(updates=updates):
        return asyncio.run(_vacuum())


async def _vacuum() -> Pruned:
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
    async with db.session_context() as session:
        return await count_flow_runs(session=session)
