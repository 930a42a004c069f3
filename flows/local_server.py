"""Let Prefect's temporary server finish recording a run before the command exits.

With no PREFECT_API_URL, Prefect starts a temporary server for the command and stops it at exit.
Task-run states reach that server as events, which its TaskRunRecorder writes to the database one
by one, behind the run. When the server stops while the recorder is still behind, Prefect 3.9
cancels the write in progress: the last task runs stay "Running" in the database (and in the UI
when the user later starts `prefect server start` on the same ~/.prefect) and the server prints
`Error flushing ... events` and `Exception during reset or similar` tracebacks after the results.
Prefect has no API to ask the recorder whether it has caught up, so this polls what it writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import TERMINAL_STATES, StateType
from prefect.events.worker import EventsWorker
from prefect.logging import get_logger
from prefect.settings import get_current_settings

PAGE = 200  # the API's largest page


def temporary_server() -> bool:
    """Whether this process talks to a temporary server that Prefect stops at exit (no API URL set)."""
    return get_current_settings().api.url is None


def _every(read: Callable[..., list[Any]], **filters: Any) -> list[Any]:
    """All pages of a client `read_*` call (the API answers at most PAGE rows a call)."""
    rows: list[Any] = []
    while page := read(**filters, limit=PAGE, offset=len(rows)):
        rows += page
        if len(page) < PAGE:
            break
    return rows


def _task_run_states(flow_run_id: UUID) -> list[tuple[UUID, StateType | None, str | None]]:
    """Each task run of the flow run and of its subflow runs (any depth), with its recorded state."""
    with get_client(sync_client=True) as client:
        runs, frontier = {flow_run_id}, [flow_run_id]
        while frontier:
            parents = FlowRunFilterParentFlowRunId(any_=frontier)
            children = _every(client.read_flow_runs, flow_run_filter=FlowRunFilter(parent_flow_run_id=parents))
            frontier = [child.id for child in children if child.id not in runs]
            runs.update(frontier)
        tasks = _every(client.read_task_runs, flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(runs))))
        return sorted(((run.id, run.state_type, run.state_name) for run in tasks), key=lambda row: str(row[0]))


def _settled(state_type: StateType | None, state_name: str | None) -> bool:
    """Final, or Pending "NotReady": Prefect's state for a task whose upstream failed, which never runs."""
    return state_type in TERMINAL_STATES or (state_type == StateType.PENDING and state_name == "NotReady")


def run_recorded(flow: Any, **parameters: Any) -> Any:
    """`flow(**parameters)`'s result (or its exception), once the server has recorded the whole run.

    For a synchronous flow called outside an event loop (every CLI command)."""
    state = flow(return_state=True, **parameters)
    wait_until_recorded(state.state_details.flow_run_id)
    return state.result()


def wait_until_recorded(flow_run_id: UUID, timeout_s: float = 60.0, quiet_s: float = 1.0) -> bool:
    """Block until the temporary server has recorded every task run of `flow_run_id` as settled.

    Done when the client's event queue is sent, every task run is final (or NotReady) and nothing
    changed over `quiet_s` seconds: with Prefect's default recorder batch size of 1 the recorder
    writes each event as it reads it, so a quiet second means it has caught up. Returns False (and
    warns) at `timeout_s` in all; does nothing against a running server, which keeps recording
    after the command exits.
    """
    if not temporary_server():
        return True
    deadline = time.monotonic() + timeout_s
    # draining logs "Still processing items" while the last events go out: news to no user
    events_log = logging.getLogger("EventsWorker")
    level = events_log.level
    events_log.setLevel(logging.ERROR)
    try:
        EventsWorker.drain_all(timeout=timeout_s, at_exit=False)
    finally:
        events_log.setLevel(level)
    before: Any = None
    while time.monotonic() < deadline:
        states = _task_run_states(flow_run_id)
        if states == before and all(_settled(state, name) for _, state, name in states):
            return True
        before = states
        time.sleep(quiet_s)
    get_logger(__name__).warning("Prefect's temporary server had not recorded every task run after %.0f s", timeout_s)
    return False
