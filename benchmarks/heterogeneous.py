"""Heterogeneous federations on AG News: distillation routes, FedCoLLM, offsite-tuning, watermarks.

    python benchmarks/heterogeneous.py [--rounds 3] [--steps 4] [--examples 400] [--only offsite watermark]

Models: SmolLM2-135M-Instruct ("135M", 30 layers) and a smaller member built from it offline by
keeping 14 of its layers and distilling the 135M into all of them on AG News articles outside the
sample ("14L", ~80M parameters, same tokenizer; no hub access here; layer drop alone breaks it). Data: the
AG News topic task of benchmarks/matrix.py, 3 clients with Dirichlet(1.0) label skew; 64 other
AG News rows are the public set. Every row gets the same rounds and steps per client.

Rows: homogeneous FedAvg (135M, and 14L) and local-only (135M); the mentee route (clients' own
135M, tuned alone, teach a shared 14L mentee); FedMKT-style logit exchange between a 135M and two
14L members, against the same members without the exchange; FedCoLLM (14L clients, a 135M on
the server); offsite-tuning (clients get an emulator of the 135M, layer drop alone and distilled
on the public set); and a watermarked
FedAvg with the detection figures. Prints markdown tables; writes benchmarks/results/heterogeneous.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from common import prepared_config, save_results
from matrix import AG_CLASSES, AG_INSTRUCTION, SHARED, write_ag_news

from fedtune.hetero.offsite import build_emulator, distill_emulator
from fedtune.model.adapters import get_adapter_state, load_state

GROUPS = ("baselines", "mentee", "fedmkt", "fedcollm", "offsite", "watermark")
NEEDS_MEMBER = {"baselines", "mentee", "fedmkt", "fedcollm"}  # the rows with a 14L member


def unseen_articles(skip: set[str]) -> list[tuple[str, str]]:
    """(class, text) of AG News rows not in the training sample, shuffled."""
    with (SHARED / "ag_news" / "ag_news_7600.csv").open() as handle:
        data = list(csv.reader(handle))
    random.Random(1).shuffle(data)
    texts = [
        (AG_CLASSES[int(label) - 1], f"{title}. {description}".replace("\\", " ")) for label, title, description in data
    ]
    return [(topic, text) for topic, text in texts if AG_INSTRUCTION + text not in skip]


def write_public(path: Path, articles: list[tuple[str, str]]) -> None:
    """The public set the distillation routes share: instruction/response rows."""
    rows = [{"instruction": AG_INSTRUCTION + text, "response": topic} for topic, text in articles]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description="heterogeneous federations and watermarks on AG News")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--public", type=int, default=64)
    parser.add_argument("--member-steps", type=int, default=150, help="distillation steps that make the 14L member")
    parser.add_argument("--emulator-steps", type=int, default=150, help="offsite emulator distillation steps")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="row groups to run")
    args = parser.parse_args()
    from flows.federated_finetune import federated_finetune
    from flows.knowledge_transfer import knowledge_transfer
    from flows.local_only import local_only
    from flows.offsite_tuning import offsite_tuning

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source, public = root / "ag_news.jsonl", root / "public.jsonl"
        write_ag_news(source, args.examples, 0)
        unseen = unseen_articles({json.loads(line)["instruction"] for line in source.read_text().splitlines()})
        write_public(public, unseen[: args.public])
        big = "models/SmolLM2-135M-Instruct"
        small = root / "smollm2-14L"
        member: dict[str, Any] = {}
        if NEEDS_MEMBER & set(args.only):
            member["plan"] = build_emulator(big, small, adaptor_layers=4, keep_every=4).__dict__
            # the member's own pre-training stands in for a real smaller model: article text only, no labels
            texts = [text for _, text in unseen[args.public :]]
            member["kl"] = distill_emulator(big, small, texts, steps=args.member_steps, lr=2e-4, every_layer=True)
            print(json.dumps({"14L member distillation KL": member["kl"]}), flush=True)
        base = [
            f"data.source={source}",
            "data.columns={instruction: instruction, input: null, response: response, label: label}",
            "data.system_prompt=Answer with the topic only.",
            "data.max_length=128",
            "data.partition.scheme=dirichlet",
            "data.partition.alpha=1.0",
            "data.partition.num_clients=3",
            "data.partition.min_partition_size=10",
            "data.partition.val_fraction=0.05",
            "data.partition.test_fraction=0.2",
            f"federation.rounds={args.rounds}",
            "federation.clients_per_round=3",
            f"train.steps_per_round={args.steps}",
            "eval.max_new_tokens=5",
            f"eval.generation_samples={args.examples}",
            f"distill.public_source={public}",
            f"distill.public_examples={args.public}",
            f"distill.public_steps={args.steps}",
        ]
        on_small = [f"model.name_or_path={small}", "model.source=null"]

        def record(name: str, models: str, summary: dict[str, Any], up: float | None = None, **extra: Any) -> None:
            rows.append(
                {
                    "method": name,
                    "models": models,
                    "accuracy": summary.get("test_accuracy"),
                    "test_loss": summary["test_loss"],
                    "bytes_up_per_client_round": summary.get("bytes_up_per_client_round", 0) if up is None else up,
                    **extra,
                }
            )
            print(json.dumps(rows[-1]), flush=True)

        def config(name: str, *extra: str):
            return prepared_config(root / name, [*base, *extra, f"federation.output_dir={root / name / 'run'}"])

        if "baselines" in args.only:
            cfg = config("fedavg-135m")
            record("FedAvg (homogeneous)", "135M x3", federated_finetune(config=cfg, prepare_data=False))
        if {"baselines", "mentee"} & set(args.only):  # the mentee's teachers are the local-only adapters
            alone_dir = root / "local-135m" / "run"
            alone_cfg = config("local-135m")
            alone = local_only(config=alone_cfg, prepare_data=False, output_dir=str(alone_dir))
            record("local-only", "135M x3", alone)
        if "baselines" in args.only:
            cfg = config("fedavg-14l", *on_small)
            record("FedAvg (homogeneous)", "14L x3", federated_finetune(config=cfg, prepare_data=False))

        if "mentee" in args.only:
            from fedtune.model.builder import export_adapter

            teachers = {
                c: str(
                    export_adapter(alone_cfg, load_state(alone_dir / f"client_{c}.safetensors"), root / f"teacher_{c}")
                )
                for c in range(3)
            }
            cfg = config("mentee", *on_small, f"distill.teachers={json.dumps(teachers)}")
            record("mentee route (KD)", "14L mentee, 135M teachers", federated_finetune(config=cfg, prepare_data=False))

        if "fedmkt" in args.only:
            fedmkt_rows(config, knowledge_transfer, small, root, record)
        if "fedcollm" in args.only:
            cfg = config("fedcollm", *on_small, f"distill.server_model={big}")
            record("FedCoLLM", "14L x3, 135M server", federated_finetune(config=cfg, prepare_data=False))
        if "offsite" in args.only:
            for steps in (0, args.emulator_steps):
                offsite_rows(config, offsite_tuning, steps, root, record)
        watermark = (
            {margin: watermark_row(config, federated_finetune, margin) for margin in (0.05, 0.2)}
            if "watermark" in args.only
            else {}
        )
    name = "heterogeneous" if set(args.only) == set(GROUPS) else "heterogeneous-" + "-".join(args.only)
    save_results(name, {"args": vars(args), "rows": rows, "watermark": watermark, "small_model": member})
    print(f"AG News, 3 clients Dirichlet(1.0), {args.rounds} rounds x {args.steps} steps, {args.examples} rows")
    print("| method | models | accuracy | test loss | upload/client/round |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        accuracy = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        upload = f"{r['bytes_up_per_client_round']:,.0f} B"
        print(f"| {r['method']} | {r['models']} | {accuracy} | {r['test_loss']:.4f} | {upload} |")
    if watermark:
        print()
        margins = " | ".join(f"margin {m}" for m in watermark)
        print(f"| watermark (64 bits, 16 weights each, threshold 0.2) | {margins} |")
        print("| --- |" + " --- |" * len(watermark))
        for key in next(iter(watermark.values())):
            print(f"| {key} | " + " | ".join(str(w[key]) for w in watermark.values()) + " |")


def fedmkt_rows(config, knowledge_transfer, small: Path, root: Path, record) -> None:
    """A 135M and two 14L members, with the logit exchange and without it (same private steps)."""
    members = [f"distill.client_models={json.dumps({1: str(small), 2: str(small)})}"]
    cfg = config("fedmkt", *members)
    shared = knowledge_transfer(config=cfg, prepare_data=False, output_dir=str(root / "fedmkt" / "run"))
    record(
        "FedMKT logit exchange",
        "135M + 14L x2",
        shared,
        per_client=shared["test_loss_per_client"],
        bytes_down=shared["bytes_down_per_client_round"],
    )
    alone = knowledge_transfer(
        config=cfg, share_knowledge=False, prepare_data=False, output_dir=str(root / "fedmkt-alone" / "run")
    )
    record("same members, no exchange", "135M + 14L x2", alone, per_client=alone["test_loss_per_client"])


def offsite_rows(config, offsite_tuning, distill_steps: int, root: Path, record) -> None:
    """The emulator clients tune and the full model with their adaptors plugged in."""
    how = f"distilled {distill_steps} steps" if distill_steps else "layer drop"
    cfg = config(f"offsite-{distill_steps}")
    summary = offsite_tuning(
        config=cfg,
        adaptor_layers=2,
        keep_every=2,
        distill_steps=distill_steps,
        prepare_data=False,
        output_dir=str(root / f"offsite-{distill_steps}" / "run"),
    )
    record(
        f"offsite-tuning ({how}): emulator",
        f"{summary['emulator_layers']}-layer emulator x3",
        {"test_accuracy": summary["emulator_test_accuracy"], "test_loss": summary["emulator_test_loss"]},
        up=summary["bytes_up_per_client_round"],
    )
    record(
        f"offsite-tuning ({how}): full model, plugged in",
        "135M (never shipped)",
        {"test_accuracy": summary["full_test_accuracy"], "test_loss": summary["full_test_loss"]},
        up=0,
        untuned=summary["full_untuned_test_loss"],
        client_visible_share=summary["client_visible_share"],
    )


def watermark_row(config, federated_finetune, margin: float) -> dict[str, Any]:
    """Client 0 signs; its bits in the global, after 20 more steps of someone else's tuning, and
    1000 random keys' verdicts on the same adapter (the empirical false-positive rate)."""
    from fedtune.model.builder import build_peft_model, tokenizer_for
    from fedtune.privacy.watermark import owner_secret, verify
    from fedtune.training.loop import local_train
    from fedtune.training.tokenized import load_encoded

    cfg = config(f"watermark-{margin}", "watermark.clients=[0]", f"watermark.margin={margin}")
    summary = federated_finetune(config=cfg, prepare_data=False)
    run = Path(cfg.federation.output_dir)
    final = load_state(run / "final_adapter.safetensors")
    secret = owner_secret(run / "clients" / "client_0")
    after = verify(final, secret, cfg.watermark)
    tokenizer = tokenizer_for(cfg)
    model = build_peft_model(cfg, final)
    local_train(
        model, load_encoded(cfg, tokenizer, 2, "train"), cfg.train, pad_id=tokenizer.pad_token_id, seed=5, steps=20
    )
    tuned = verify(get_adapter_state(model), secret, cfg.watermark)
    strangers = [verify(final, os.urandom(32), cfg.watermark) for _ in range(1000)]
    return {
        "test loss with the watermark": round(summary["test_loss"], 4),
        "test accuracy with the watermark": summary["test_accuracy"],
        "owner's BER in the global": after["ber"],
        "owner's BER after 20 more steps by client 2": tuned["ber"],
        "random keys detecting it (of 1000)": sum(s["detected"] for s in strangers),
        "mean BER of random keys": round(sum(s["ber"] for s in strangers) / len(strangers), 4),
        "false-positive rate (binomial tail, 64 bits, 0.2)": f"{after['false_positive_rate']:.2e}",
    }


if __name__ == "__main__":
    main()
