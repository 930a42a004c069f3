"""Knowledge transfer between clients with different models (FedMKT-style logit exchange).

Each round: every client tunes its own adapter privately, sends top-k logits on the public data,
the server aligns and fuses them per receiver, and every client distills its fused teacher
(fedtune/hetero/knowledge_transfer.py). `share_knowledge=False` runs the same private training with no
exchange: the local-only baseline on the same budget. Per round, every client's own model is
evaluated on the global test set; the run's metrics are their mean.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from fedtune.config.schema import FedConfig
from fedtune.hetero.knowledge_transfer import check_transfer, client_config, public_texts
from fedtune.round.outputs import write_outputs
from fedtune.training.distillation import message_bytes
from flows.common import failing_run, open_run
from tasks.evaluation import evaluate
from tasks.knowledge_transfer import distill, fuse_for, send_logits, train_private
from tasks.tracking import finish_tracking, log_round

METRICS = ("test_loss", "test_accuracy")


def _adapter(folder: str, round_: int) -> str:
    return str(Path(folder) / "adapter" / f"round_{round_:04d}.safetensors")


@flow(name="knowledge-transfer")
def knowledge_transfer(
    config: FedConfig = FedConfig(),  # noqa: B008 (Prefect shows the defaults in the run form)
    share_knowledge: bool = True,
    output_dir: str = "outputs/knowledge_transfer",
    prepare_data: bool = True,
) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.perf_counter()
    texts = public_texts(config)
    check_transfer(config, texts)  # unalignable tokenizers or a top_k past a vocabulary: before any work
    kind = "knowledge_transfer" if share_knowledge else "knowledge_transfer_local_only"
    run, run_id = open_run(config, kind, output_dir, prepare_data=prepare_data)
    clients = list(range(config.data.partition.num_clients))
    folders = {c: str(Path(run) / "clients" / f"client_{c}") for c in clients}
    history: list[dict[str, Any]] = []
    with failing_run(config, run_id):
        for round_ in range(1, config.federation.rounds + 1):
            reports = [train_private(config, c, round_, folders[c]) for c in clients]
            up = down = 0
            if share_knowledge:
                messages = {c: send_logits(config, c, round_, folders[c], texts) for c in clients}
                up = sum(message_bytes(m) for m in messages.values())
                for c in clients:
                    targets, sent_back = fuse_for(config, c, messages, texts)
                    down += sent_back
                    reports[c] |= distill(config, c, round_, folders[c], texts, targets)
            scores = {
                c: evaluate(client_config(config, c), _adapter(folders[c], round_), f"r{round_}-client-{c}", False)
                for c in clients
            }
            row: dict[str, Any] = {"round": round_}
            for key in (k for k in METRICS if k in scores[0]):
                row[key] = sum(s[key] for s in scores.values()) / len(clients)
                row |= {f"client_{c}/{key}": s[key] for c, s in scores.items()}
            row |= {"bytes_up_per_client": up / len(clients), "bytes_down_per_client": down / len(clients)}
            history.append(row)
            log_round(config, run_id, round_, row, reports, history)
    final = history[-1]
    summary: dict[str, Any] = {
        "method": kind,
        "rounds": final["round"],
        "test_loss": final["test_loss"],
        "test_accuracy": final.get("test_accuracy"),
        "test_loss_per_client": [final[f"client_{c}/test_loss"] for c in clients],
        "bytes_up_per_client_round": final["bytes_up_per_client"],
        "bytes_down_per_client_round": final["bytes_down_per_client"],
        "wall_seconds": time.perf_counter() - started,
        "mlflow_run_id": run_id,
    }
    finish_tracking(config, run_id, summary)
    write_outputs(Path(run), summary, history)
    logger.info("%s: mean test loss %.4f per client %s", kind, summary["test_loss"], summary["test_loss_per_client"])
    return summary
