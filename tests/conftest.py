"""Fixtures: a tiny tokenizer and 2-layer Llama built locally, and a tiny config around them."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per torch process (this one and every child): the tiny models gain nothing from a
# second thread, and two processes with two threads each on two cores stall each other (the
# session model took 8 s with one thread and 191 s with two on a loaded machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
BIN = Path(sys.executable).parent


def measured(env: dict[str, str]) -> dict[str, str]:
    """`env` for a subprocess whose code runs nowhere else (a served flow's runs, a command's wait
    for the temporary server), with this process's coverage settings when it is measured, so that
    subprocess is measured too (coverage's own .pth starts it). Not the default for every subprocess:
    each imports torch under the tracer (+45% CPU), 190 CPU-s of the suite for 1.4 points."""
    import coverage

    current = coverage.Coverage.current()
    return env if current is None else {**env, "COVERAGE_PROCESS_CONFIG": current.config.serialize()}


def _interrupted_when_parent_dies() -> None:  # in the child, before it runs `args`
    """Linux's PR_SET_PDEATHSIG: SIGINT when the process that started this one exits, however it
    exits (SIGTERM from `timeout` or a CI cancel runs no pytest hook), so no server is orphaned."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # 1: PR_SET_PDEATHSIG


def start_process(
    args: list[str], env: dict[str, str], cwd: Path, log: Path, dies_with_parent: bool = False
) -> subprocess.Popen[bytes]:
    """`args` in a session of its own (so `stop_process` reaches its children), output to `log`;
    with `dies_with_parent`, interrupted when this process exits."""
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_interrupted_when_parent_dies if dies_with_parent else None,
        )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Interrupt the process group `start_process` started, then kill it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


SHARED_PREFECT = "FEDTUNE_TEST_PREFECT_HOME"  # the shared server's home, set by xdist's controller
_SHARED = pytest.StashKey[tuple[subprocess.Popen[bytes], Path]]()  # the controller's server and home


def _start_prefect_server(home: Path) -> subprocess.Popen[bytes]:
    """A real Prefect server with its own home (database, log, `url` file), on a free port. It writes
    task runs and events in batches each second; Prefect's default writes each task-run event in a
    transaction of its own, 30% of the server's CPU in tests/test_flows.py (no test reads task runs
    from it). No automations run here, so no triggers service."""
    from deploy.servers import free_port

    port = str(free_port())
    (home / "url").write_text(f"http://127.0.0.1:{port}/api")
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "100",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("PYTEST_CURRENT_TEST", None)  # it serves the session, not the test that happened to start it
    args = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port, "--no-ui"]
    server = start_process(args, env, home, home / "server.log", dies_with_parent=True)
    (home / "pid").write_text(str(server.pid))
    return server


def _running(pid: int) -> bool:
    """Whether process `pid` runs (not exited, nor a zombie its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_prefect_server(home: Path) -> str:
    url, pid = (home / "url").read_text(), int((home / "pid").read_text())
    deadline = time.monotonic() + 120
    while True:
        log = home / "server.log"
        assert _running(pid), f"the session's Prefect server exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the session's Prefect server did not start: {log.read_text()[-3000:]}"
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            if answer.status == 200:
                return url
        time.sleep(0.5)


def pytest_configure(config: pytest.Config) -> None:
    """xdist's controller starts the session's one Prefect server before its workers start (so it
    comes up while they collect), and they all use it: one server per session, not one per
    worker (about 7 CPU-s each to start). The tests that share it only read what they made."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        home = Path(tempfile.mkdtemp(prefix="fedtune-prefect-"))
        config.stash[_SHARED] = (_start_prefect_server(home), home)
        os.environ[SHARED_PREFECT] = str(home)  # the workers inherit it


def pytest_unconfigure(config: pytest.Config) -> None:
    if (shared := config.stash.get(_SHARED, None)) is not None:
        os.environ.pop(SHARED_PREFECT, None)  # a later session in this process starts its own
        stop_process(shared[0])
        shutil.rmtree(shared[1], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prefect server for the whole session: xdist's controller's (`pytest_configure`), or
    without workers, this process's own. This process and every child (the CLI, DVC's stages,
    served deployments) talk to it, instead of each starting a temporary server of its own (about
    10 s each). Its scheduler looks for due runs every second, so a schedule fires in seconds. Tests
    that need a server configured otherwise (authentication, a server they kill) start their own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    shared = os.environ.get(SHARED_PREFECT)
    shared = shared if shared and Path(shared, "url").exists() else None  # not a stale variable's
    home = Path(shared) if shared else tmp_path_factory.mktemp("prefect")
    server = None if shared else _start_prefect_server(home)
    try:
        url = _wait_for_prefect_server(home)
        with pytest.MonkeyPatch.context() as patch, temporary_settings(updates={PREFECT_API_URL: url}):
            patch.setenv("PREFECT_API_URL", url)
            patch.setenv("PREFECT_RUNNER_POLL_FREQUENCY", "1")  # a served deployment picks up its run at once
            yield url
            # send what Prefect's log and event workers still hold while the server is up (after it
            # stops, they retry for minutes at exit), as prefect_test_harness does
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)
    finally:
        if server is not None:
            stop_process(server)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """A model family's tokenizer conventions: its special tokens and chat template."""

    special: tuple[str, ...]
    bos: str
    eos: str
    pad: str | None
    template: str | None


QWEN = Family(("<unk>", "<|im_start|>", "<|im_end|>"), "<|im_start|>", "<|im_end|>", "<|im_end|>", CHATML)


def build_tokenizer(directory: Path, with_template: bool = True, vocab_size: int = 600, family: Family = QWEN) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fedtune.core.catalog import SKILLS
    from fedtune.data.synthetic import generate

    rows = generate(SKILLS.names(), 30, seed=1)
    texts = [f"system user assistant Answer with the result only. {r['instruction']} {r['response']}" for r in rows]
    texts += [" ".join(str(i) for i in range(10000))]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token="<unk>",
        additional_special_tokens=[t for t in family.special if t not in ("<unk>", family.bos, family.eos)],
    )
    if with_template and family.template is not None:
        tokenizer.chat_template = family.template
    tokenizer.save_pretrained(directory)
    return directory


def build_model(directory: Path, vocab_size: int, layers: int = 2, hidden: int = 64, pretrain_steps: int = 80) -> Path:
    """A 2-layer Llama, briefly pretrained on chat-formatted text so it behaves like a small
    pretrained LM (a random one barely responds to LoRA), then saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedtune.data.prompts import collate, encode
    from fedtune.data.synthetic import generate

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    rows = generate(["compare", "sort", "last_letter", "uppercase"], 60, seed=2)
    records = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]}
        for r in rows
    ]
    data = [e for e, _ in (encode(tokenizer, r, None, 64, "response") for r in records) if e is not None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(pretrain_steps):
        batch = collate([data[(step * 16 + i) % len(data)] for i in range(16)], tokenizer.pad_token_id)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-model")
    build_tokenizer(directory)
    build_model(directory, len(AutoTokenizer.from_pretrained(directory)))
    return directory


@functools.cache
def migrated_mlflow_store() -> Path:
    """An empty MLflow SQLite store at MLflow's newest schema, made once per test process. A new
    store runs all of MLflow's schema migrations (about 1.5 s on 2 cores, in every test that
    tracks a run); a copy of this one starts at the newest schema."""
    from mlflow import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="fedtune-mlflow-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def tiny_overrides(root: Path, model_dir: Path) -> dict:
    """A config small enough for CPU tests; everything it writes goes under `root`, where an
    absolute `root` gets a copy of the migrated, empty MLflow store (`migrated_mlflow_store`)."""
    if root.is_absolute() and not (root / "mlflow.db").exists():
        root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(migrated_mlflow_store(), root / "mlflow.db")
    return {
        "model": {"name_or_path": str(model_dir), "source": None, "dtype": "float32"},
        "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "max_length": 48,
            "synthetic": {"examples_per_skill": 40, "skills": ["add", "parity", "successor"]},
            "partition": {"num_clients": 3, "alpha": 0.5, "min_partition_size": 5, "test_fraction": 0.15},
            "processed_path": str(root / "data" / "processed.jsonl"),
            "partitions_dir": str(root / "data" / "partitions"),
        },
        "federation": {"rounds": 3, "clients_per_round": 2, "output_dir": str(root / "outputs" / "federated")},
        "train": {"lr": 0.01, "batch_size": 4, "steps_per_round": 6},
        "eval": {"batch_size": 16, "generation_samples": 8, "max_new_tokens": 4},
        "tracking": {
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "artifact_location": str(root / "mlartifacts"),
            "experiment": "tests",
        },
    }


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from fedtune.config.schema import build_config

    return build_config(tiny_overrides(tmp_path, tiny_model_dir))


# The files that take longest in `make test` (their span in `benchmarks/suite_cpu.py`'s table, 3
# workers on 2 cores; measured at 854ea20), longest first; every other file takes under 10 s.
SLOW_FILES = (
    "test_flows.py",  # 132 s
    "test_dvc_pipeline.py",  # 116 s
    "test_continual.py",  # 84 s
    "test_scale.py",  # 72 s
    "test_crash_resume.py",  # 71 s
    "test_serve.py",  # 46 s
    "test_distillation.py",  # 35 s
    "test_peft_methods.py",  # 35 s
    "test_cli.py",  # 33 s
    "test_combinations.py",  # 32 s
    "test_gpu_benchmark.py",  # 30 s
    "test_readme.py",  # 27 s
    "test_adapter_state.py",  # 18 s
    "test_suites.py",  # 18 s
    "test_compression.py",  # 15 s
    "test_offsite.py",  # 14 s
    "test_objectives.py",  # 12 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the files for `make test`'s workers. xdist's loadfile hands each worker the next file
    when its current one has at most 2 tests left, so the order decides how evenly the workers end
    (a long file handed out last keeps one worker busy alone). First the deployment file, the
    longest and mostly waiting on its parties; then the slow files longest first, each followed by
    a short one (the file a worker is handed early, while a one-test file is still running, is
    short); the short files last, so the workers end within seconds of each other."""
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.path.name, []).append(item)
    slow = [name for name in SLOW_FILES if name in files]
    rest = [name for name in files if name not in slow and name != "test_deployment.py"]
    order = ["test_deployment.py"] if "test_deployment.py" in files else []
    while slow or rest:
        order += [queue.pop(0) for queue in (slow, rest) if queue]
    items[:] = [item for name in order for item in files[name]]
