"""Whether a client's workers are gone, judged against the rest of the federation's heartbeats.

Prefect counts a worker offline once it has missed three heartbeats by the wall clock
(server.services.foreman.inactivity_heartbeat_multiple). Alone, that rule drops live clients
whenever the server itself stops taking heartbeats: on a loaded machine the one-machine server
answers 503 for as long as its SQLite writes keep colliding, every worker's heartbeat fails alike,
and a live worker looks as silent as a killed one (CI saw a live client dropped this way, 30 s
without a recorded beat, in the round before the one whose client was killed). So a pool counts as
gone only when, besides that rule, some worker of another pool of the federation had
MISSED_HEARTBEATS + 1 beats recorded at its usual pace after the pool's last one: the server was
taking heartbeats all that time, and none came from this pool.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import httpx

# Prefect's own rule for a worker gone offline (server.services.foreman.inactivity_heartbeat_multiple)
MISSED_HEARTBEATS = 3
DEFAULT_INTERVAL_S = 30  # Prefect's PREFECT_WORKER_HEARTBEAT_SECONDS, for a worker that did not say


class HeartbeatWatch:
    """The heartbeats the server recorded for the workers of some work pools, as polled by the
    coordinator: `observe` reads them (one API call per pool), `gone` judges one pool."""

    def __init__(self, api: Any, transient: Callable[[Exception], bool]) -> None:
        self.api, self.transient = api, transient
        self.beats: dict[tuple[str, str], set[datetime.datetime]] = defaultdict(set)  # (pool, worker) -> seen
        self.intervals: dict[tuple[str, str], float] = {}
        self.workers: dict[str, list[Any]] = {}  # pool -> its workers, as read by the last observe()

    def observe(self, pools: Iterable[str]) -> None:
        """Read each pool's workers. A pool whose read fails transiently (`transient(error)`) is
        judged by nothing until a read succeeds again; any other API error is raised."""
        self.workers = {}
        for pool in set(pools):
            try:
                workers = list(self.api.read_workers_for_work_pool(pool))
            except httpx.HTTPError as error:
                if not self.transient(error):
                    raise
                continue
            self.workers[pool] = workers
            for worker in workers:
                key = (pool, worker.name)
                self.intervals[key] = worker.heartbeat_interval_seconds or DEFAULT_INTERVAL_S
                if worker.last_heartbeat_time is not None:
                    self.beats[key].add(worker.last_heartbeat_time)

    def _steady_beats_since(self, key: tuple[str, str], since: datetime.datetime) -> int:
        """How many of a worker's latest beats after `since` came at its usual pace (each within two
        intervals of the next): beats from before a gap, such as a server stall, do not count."""
        count, later = 0, None
        for beat in sorted((t for t in self.beats[key] if t > since), reverse=True):
            if later is not None and (later - beat).total_seconds() > 2 * self.intervals[key]:
                break
            count, later = count + 1, beat
        return count

    def gone(self, pool: str | None) -> str | None:
        """Why `pool`'s client cannot finish though its run's state says it may: every worker of the
        pool has missed MISSED_HEARTBEATS heartbeats (killed, or its machine gone) while a worker of
        another pool kept beating steadily, so nobody will run it or report it crashed. None while a
        worker of the pool is alive, where the pool has no worker on record yet or its last read
        failed, or until another pool's worker has beaten MISSED_HEARTBEATS + 1 times at its usual
        pace since (the server may not have been taking heartbeats, and after a stall the workers'
        retries come back scattered)."""
        name = pool or ""
        workers = self.workers.get(name, [])
        if not workers:
            return None
        now = datetime.datetime.now(datetime.timezone.utc)
        never = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
        last = {w.name: w.last_heartbeat_time or never for w in workers}
        if any((now - last[n]).total_seconds() <= MISSED_HEARTBEATS * self.intervals[(name, n)] for n in last):
            return None
        newest = max(last.values())
        steady = (self._steady_beats_since(key, newest) for key in self.beats if key[0] != name)
        if max(steady, default=0) <= MISSED_HEARTBEATS:
            return None
        return f"every worker of its pool {name} stopped sending heartbeats"
