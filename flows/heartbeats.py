"""Whether a client's workers are gone, judged against the rest of the federation's heartbeats.

Prefect counts a worker offline once it has missed three heartbeats by the wall clock
(server.services.foreman.inactivity_heartbeat_multiple). Alone, that rule drops live clients
whenever the server itself stops taking heartbeats: on a loaded machine the one-machine server
answers 503 for as long as its SQLite writes keep colliding, every worker's heartbeat fails alike,
and a live worker looks as silent as a killed one (CI saw a live client dropped this way, 30 s
without a recorded beat, in the round before the one whose client was killed). So a pool counts as
gone only when, besides that rule, some worker of another pool of the federation had
MISSED_HEARTBEATS beats recorded after the pool's last one: the server was taking heartbeats all
that time, and none came from this pool.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

# Prefect's own rule for a worker gone offline (server.services.foreman.inactivity_heartbeat_multiple)
MISSED_HEARTBEATS = 3
DEFAULT_INTERVAL_S = 30  # Prefect's PREFECT_WORKER_HEARTBEAT_SECONDS, for a worker that did not say


class HeartbeatWatch:
    """The heartbeats the server recorded for the workers of some work pools, as polled by the
    coordinator: `observe` reads them (one API call per pool), `gone` judges one pool."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.beats: dict[tuple[str, str], set[datetime.datetime]] = defaultdict(set)  # (pool, worker) -> seen
        self.workers: dict[str, list[Any]] = {}  # pool -> its workers at the last observation

    def observe(self, pools: Iterable[str]) -> None:
        """Read each pool's workers; raises the API's httpx errors."""
        for pool in set(pools):
            self.workers[pool] = list(self.api.read_workers_for_work_pool(pool))
            for worker in self.workers[pool]:
                if worker.last_heartbeat_time is not None:
                    self.beats[(pool, worker.name)].add(worker.last_heartbeat_time)

    def gone(self, pool: str | None) -> str | None:
        """Why `pool`'s client cannot finish though its run's state says it may: every worker of the
        pool has missed MISSED_HEARTBEATS heartbeats (killed, or its machine gone) while another pool's
        worker kept beating, so nobody will run it or report it crashed. None while a worker of the
        pool is alive, where the pool has no worker on record yet, or while no other pool's worker has
        beaten MISSED_HEARTBEATS times since (the server may not be taking heartbeats at all)."""
        workers = self.workers.get(pool or "", [])
        if not workers:
            return None
        now = datetime.datetime.now(datetime.timezone.utc)
        never = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
        last = {w.name: w.last_heartbeat_time or never for w in workers}
        interval = {w.name: w.heartbeat_interval_seconds or DEFAULT_INTERVAL_S for w in workers}
        if any((now - last[name]).total_seconds() <= MISSED_HEARTBEATS * interval[name] for name in last):
            return None
        newest = max(last.values())
        since = (len([t for t in seen if t > newest]) for (other, _), seen in self.beats.items() if other != pool)
        if max(since, default=0) < MISSED_HEARTBEATS:
            return None
        return f"every worker of its pool {pool} stopped sending heartbeats"
