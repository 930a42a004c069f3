"""What every flow does first: the base model and the data ready."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedtune.config.schema import FedConfig
from fedtune.data.loading import FILE_BUILDERS, as_loaded, check_columns, load_records
from fedtune.data.synthetic import COLUMNS as SYNTHETIC_COLUMNS
from fedtune.model.loading import check_model
from fedtune.round.outputs import clear_outputs
from fedtune.round.resume import check_resume
from fedtune.training.suites import check_suite_file
from flows.runners import check_runner
from tasks.data import partition, prepare_data
from tasks.model import prepare_model
from tasks.tracking import fail_tracking, start_tracking


def preflight(config: FedConfig, *, resume: bool = False) -> None:
    """Cheap checks that name the bad field before any task runs (with `resume`, also the config
    against the checkpoint's, so a refused resume prints its message before any server starts)."""
    if resume:
        check_resume(config)
    check_model(config.model)
    check_runner(config.federation)
    for suite, path in config.eval.suites.items():  # a bad suite file is named now, not after the first round
        check_suite_file(suite, path)
    if config.data.source == "synthetic":
        check_columns(as_loaded(config.data), list(SYNTHETIC_COLUMNS))
    elif Path(config.data.source).suffix in FILE_BUILDERS and not config.deployment.enabled:
        load_records(config.data)  # a file that cannot be read, a missing column or a null value, named now


def prepare(config: FedConfig, *, data: bool = True) -> dict[str, Any] | None:
    """Base model present; data prepared and partitioned unless `data` is False (DVC did it)."""
    preflight(config)
    prepare_model(config)
    return partition(config, prepare_data(config)) if data else None


def open_run(config: FedConfig, kind: str, output_dir: str, *, prepare_data: bool) -> tuple[Path, str]:
    """No stale results in `output_dir`, model and data ready, a new MLflow run; its folder and id."""
    run = Path(output_dir)
    prepare(config, data=prepare_data)
    clear_outputs(run)  # only once the input is known to be good: bad input deletes nothing
    return run, start_tracking(config, kind)


@contextmanager
def failing_run(config: FedConfig, run_id: str) -> Iterator[None]:
    """Mark the MLflow run FAILED if the body raises, then re-raise."""
    try:
        yield
    except BaseException:
        fail_tracking(config, run_id)
        raise
