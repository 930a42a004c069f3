"""One client's part of a round: start from the global adapter, train locally, emit the update.

Only the update (local - global) leaves this function, as a safetensors file whose length is
the upload cost; the client's data never does.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedtune.config.schema import FedConfig
from fedtune.core.catalog import CLIENT_FEATURES
from fedtune.core.faults import crash_point
from fedtune.core.sampling import client_seed
from fedtune.model.adapters import get_adapter_state, load_state, subtract
from fedtune.model.builder import build_peft_model, tokenizer_for
from fedtune.round.client_report import ClientReport
from fedtune.round.envelope import write_update
from fedtune.training.client_feature import ClientRound
from fedtune.training.evaluation import loss_and_perplexity
from fedtune.training.loop import local_train, total_steps
from fedtune.training.tokenized import load_encoded


def train_client(
    cfg: FedConfig,
    *,
    client: int,
    round_: int,
    global_path: str | Path,
    update_path: str | Path,
    private_dir: str | Path,
    server_view_path: str | Path | None = None,
) -> ClientReport:
    """`private_dir` is the client's own folder (its secret, its privacy ledger, its strategy
    state); `server_view_path` what the strategy shares of the server's state (`client_view`).
    Every optional part of the round is a `ClientFeature` (`fedtune.core.catalog.CLIENT_FEATURES`)."""
    r = ClientRound(
        cfg,
        client,
        round_,
        Path(private_dir),
        load_state(global_path),
        load_state(server_view_path) if server_view_path else {},
    )
    features = [
        feature()
        for feature in (CLIENT_FEATURES.get(name) for name in CLIENT_FEATURES.in_order())
        if feature.enabled(cfg, client)
    ]
    for feature in features:
        feature.configure(r)
    r.tokenizer = tokenizer_for(r.cfg)
    r.train, r.val = load_encoded(r.cfg, r.tokenizer, client, "train"), load_encoded(r.cfg, r.tokenizer, client, "val")
    for feature in features:
        feature.prepare_data(r)
    r.steps = total_steps(r.cfg.train, len(r.train))
    r.model, r.start = build_peft_model(r.cfg, r.global_state), r.global_state
    for feature in features:
        feature.prepare_training(r)
    pad = r.tokenizer.pad_token_id
    seed = client_seed(r.cfg.train.seed, round_, client)
    result = local_train(
        r.model, r.train, r.cfg.train, pad_id=pad, seed=seed, steps=r.steps, objective=r.objective, dp=r.dp,
        desc=f"round {round_} client {client}",
    )  # fmt: skip
    crash_point("training", round_)  # after the optimizer steps, before the update exists
    r.local_state = get_adapter_state(r.model)
    for feature in features:
        feature.after_training(r)
    update = subtract(r.local_state, r.start)
    for feature in features:
        update = feature.outgoing(r, update)
    bytes_up = write_update(update, update_path, round_=round_, client=client, extras=r.extras)
    tick = time.perf_counter()
    val_loss = loss_and_perplexity(r.model, r.val, batch_size=r.cfg.eval.batch_size, pad_id=pad)["loss"]
    val_seconds = time.perf_counter() - tick + r.val_seconds
    for feature in features:
        feature.finish(r)
    return ClientReport(
        client=client,
        round=round_,
        update_path=str(update_path),
        num_examples=len(r.train),
        bytes_up=bytes_up,
        bytes_down=Path(global_path).stat().st_size,
        train_loss=result.mean_loss,
        train_loss_first=result.first_loss,
        train_loss_last=result.last_loss,
        val_loss=val_loss,
        steps=result.steps,
        tokens=result.tokens,
        seconds=result.seconds,
        val_seconds=val_seconds,
        features=r.report,
    )
