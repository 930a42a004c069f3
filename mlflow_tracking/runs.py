"""One MLflow parent run per flow run: resolved config, lineage tags, per-round metrics, adapters.

Metrics of round r are logged at `step=r`, so the MLflow UI plots them over rounds and runs
of different methods (federated, local-only, centralized) compare on the same keys.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_tracking.lineage import dvc_data_version, dvc_md5, git_commit
from mlflow_tracking.plots import plot_rounds

log = logging.getLogger(__name__)
ROUND_STARTED, ROUND_LOGGED = "fedtune.round_started", "fedtune.round_logged"  # see RunTracker.log_rounds


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their string form."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _round_metrics(global_metrics: Mapping[str, Any], clients: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    metrics = dict(_numeric(global_metrics))
    for report in clients:
        for key, value in _numeric(report).items():
            if key not in ("client", "round"):
                metrics[f"client_{report['client']}/{key}"] = value
    return metrics


class RunTracker:
    """A handle on one parent run; every method logs into it, whichever thread calls."""

    def __init__(self, run_id: str, tracking_uri: str) -> None:
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)

    @classmethod
    def start(
        cls,
        *,
        tracking_uri: str,
        experiment: str,
        artifact_location: str | None,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        resume_run_id: str | None = None,
    ) -> RunTracker:
        """Open a new parent run, or reopen `resume_run_id` when a flow resumes."""
        client = MlflowClient(tracking_uri=tracking_uri)
        if resume_run_id is not None:
            client.update_run(resume_run_id, status="RUNNING")
            return cls(resume_run_id, tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else client.create_experiment(
                experiment, artifact_location=Path(artifact_location).resolve().as_uri() if artifact_location else None
            )
        )
        all_tags = {"git.commit": git_commit(), "dvc.data_version": dvc_data_version(), **tags}
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        tracker = cls(run.info.run_id, tracking_uri)
        tracker.log_params(params)
        return tracker

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int | None = None, tags: Mapping[str, str] | None = None
    ) -> None:
        """`metrics` at `step`, in batches of 500; `tags` go with the last batch."""
        items = [
            mlflow.entities.Metric(k, v, int(mlflow.utils.time.get_current_time_millis()), step or 0)
            for k, v in _numeric(metrics).items()
        ]
        if not items and not tags:
            return
        starts = range(0, max(len(items), 1), 500)
        marks = [mlflow.entities.RunTag(k, v) for k, v in (tags or {}).items()]
        for start in starts:
            last = marks if start == starts[-1] else []
            self.client.log_batch(self.run_id, metrics=items[start : start + 500], tags=last)

    def log_round(self, round_: int, global_metrics: Mapping[str, Any], clients: Sequence[Mapping[str, Any]]) -> None:
        """Global metrics plus one `client_<id>/<metric>` series per client, at step=round."""
        self.log_rounds([(round_, global_metrics, clients)])

    def log_rounds(self, rounds: Sequence[tuple[int, Mapping[str, Any], Sequence[Mapping[str, Any]]]]) -> None:
        """Log (round, global metrics, client reports) triples, skipping every (metric, step) the run
        already has: a round logged again (a retried task, a resumed run catching up, a round recomputed
        from an earlier checkpoint) keeps exactly one value per step. A report's `data_version`
        becomes the run's `lineage.data.client_<c>` tag.

        Two tags make this a few requests per round, not one per metric (each costs a password
        check on an authenticated server): `ROUND_STARTED` is set before a round's metrics are
        sent and `ROUND_LOGGED` with its last batch. Rounds reach a run in increasing order (every
        flow logs round r after round r - 1; one call sorts its rounds), so a round at most
        ROUND_LOGGED is already there and skipped; only the round a crash interrupted
        (ROUND_STARTED past ROUND_LOGGED), or a run without the tags, is compared metric by metric
        with what the run holds."""
        run = self.client.get_run(self.run_id).data
        logged, started = int(run.tags.get(ROUND_LOGGED, -1)), int(run.tags.get(ROUND_STARTED, -1))
        unsure = ROUND_LOGGED not in run.tags and bool(run.metrics)
        for round_, metrics in sorted(((r, _round_metrics(m, c)) for r, m, c in rounds), key=lambda item: item[0]):
            if round_ <= logged:
                continue
            if unsure or round_ == started:
                metrics = {k: v for k, v in metrics.items() if round_ not in self.metric_history(k)}
            self.set_tags({ROUND_STARTED: str(round_)})
            self.log_metrics(metrics, step=round_, tags={ROUND_LOGGED: str(round_)})
            logged = round_
        versions = {  # a deployed client reports the DVC md5 of the data it trained on
            f"lineage.data.client_{report['client']}": str(report["data_version"])
            for _, _, clients in rounds
            for report in clients
            if "data_version" in report
        }
        if versions:
            self.set_tags(versions)

    def log_data_inputs(self, splits: Mapping[str, str | Path]) -> None:
        """Each data split (name -> JSONL file, e.g. `client_0/train`) as an MLflow dataset input
        whose digest is the file's DVC md5: the run's Datasets column and DVC's cache name the same
        version. The context tag is the split (`train`, `val`, `test`); a file this machine does
        not hold is left out."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        inputs = []
        for name, path in splits.items():
            if not Path(path).is_file():
                continue  # e.g. a split this machine does not hold: lineage of what is here only
            with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns of it
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(Path(path).resolve().as_uri())
            # MLflow's documented use of MetaDataset; its `profile` is abstract only to the type checker
            dataset = MetaDataset(source, name=name, digest=dvc_md5(path))._to_mlflow_entity()  # type: ignore[abstract]
            context = mlflow.entities.InputTag("mlflow.data.context", name.rsplit("/", 1)[-1])
            inputs.append(mlflow.entities.DatasetInput(dataset, [context]))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_results_row(self, row: Mapping[str, Any]) -> None:
        """`row` as the run's `results.json`, an MLflow table (`mlflow.load_table("results.json",
        run_ids=...)` joins several runs' rows). Written whole with the tag `log_table` sets, not
        through `log_table`, which appends: a run resumed for more rounds replaces its row."""
        self.log_dict({"columns": list(row), "data": [list(row.values())]}, "results.json")  # pandas "split"
        tags = json.loads(self.client.get_run(self.run_id).data.tags.get("mlflow.loggedArtifacts", "[]"))
        if (table := {"path": "results.json", "type": "table"}) not in tags:
            self.set_tags({"mlflow.loggedArtifacts": json.dumps([*tags, table])})

    def ui_url(self) -> str | None:
        """The run's page in the MLflow UI when the store is an MLflow server (http or https);
        None for a local store, which has no UI until `mlflow ui` serves it."""
        uri = self.client.tracking_uri
        if not uri.startswith(("http://", "https://")):
            return None
        experiment = self.client.get_run(self.run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{self.run_id}"

    def artifact_paths(self, folder: str) -> set[str]:
        return {info.path for info in self.client.list_artifacts(self.run_id, folder)}

    def metric_history(self, key: str) -> dict[int, float]:
        """A metric's value at every step (round)."""
        return {m.step: m.value for m in self.client.get_metric_history(self.run_id, key)}

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> str:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)
        return artifact_path

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_round_plot(self, history: Sequence[Mapping[str, Any]]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_rounds(history, Path(tmp) / "rounds.png")
            if path is not None:
                self.client.log_artifact(self.run_id, str(path), "plots")

    def log_new_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """`log_metrics` of the metrics the run does not have at `step` yet (a resumed run finishing again)."""
        self.log_metrics({k: v for k, v in _numeric(metrics).items() if step not in self.metric_history(k)}, step)

    def register(self, artifact_path: str, name: str, tags: Mapping[str, str] | None = None) -> str:
        """Register an adapter artifact as a new version of `name` tagged `tags`; returns the version.
        Idempotent: a version of this run with the same source and tags is returned instead (a
        finished run finishing again on `--resume`, rel-11)."""
        wanted = dict(tags or {})
        for found in self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'"):
            if str(found.source).endswith(f"/{artifact_path}") and all(
                found.tags.get(k) == v for k, v in wanted.items()
            ):
                return str(found.version)
        try:
            self.client.create_registered_model(name)
        except MlflowException as error:
            if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(name, source, run_id=self.run_id, tags=wanted)
        return str(version.version)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
