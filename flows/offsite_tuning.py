"""Offsite-tuning: clients federate LoRA on an emulator's adaptor layers; the owner plugs the
result into the full model, which never leaves it (fedtune/hetero/offsite.py).

Reported: the emulator's and the plugged-in full model's test metrics (their gap is the cost of
the layer-drop emulator), the full model untuned, and what each party sees.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from fedtune.config.schema import FedConfig
from fedtune.hetero.knowledge_transfer import public_texts
from fedtune.hetero.offsite import EmulatorPlan, plug_in
from fedtune.model.adapters import load_state, save_state
from fedtune.model.builder import initial_adapter_state
from fedtune.round.outputs import write_outputs
from flows.common import failing_run, open_run
from flows.federated_finetune import federated_finetune
from tasks.evaluation import evaluate
from tasks.model import distill_emulator_task, emulator
from tasks.tracking import finish_tracking, log_adapter


def _update(config: FedConfig, **sections: dict[str, Any]) -> FedConfig:
    return config.model_copy(
        update={name: getattr(config, name).model_copy(update=values) for name, values in sections.items()}
    )


@flow(name="offsite-tuning")
def offsite_tuning(
    config: FedConfig = FedConfig(),  # noqa: B008 (Prefect shows the defaults in the run form)
    adaptor_layers: int = 2,
    keep_every: int = 2,
    distill_steps: int = 0,
    output_dir: str = "outputs/offsite",
    prepare_data: bool = True,
) -> dict[str, Any]:
    """`distill_steps` > 0: the owner first distills its model into the emulator's middle layers on
    the public data (`distill.public_source`)."""
    logger = get_run_logger()
    started = time.perf_counter()
    texts = [t.text for t in public_texts(config)] if distill_steps else []
    run, run_id = open_run(config, "offsite_tuning", output_dir, prepare_data=prepare_data)
    with failing_run(config, run_id):
        plan = EmulatorPlan(**emulator(config, str(run / "emulator"), adaptor_layers, keep_every))
        distilled = distill_emulator_task(config, str(run / "emulator"), texts, distill_steps) if texts else {}
        on_emulator = _update(
            config,
            model={"name_or_path": str(run / "emulator"), "source": None},
            peft={"layers": plan.adaptors},
            federation={"output_dir": str(run / "federated")},
            tracking={"register_final": "never"},  # an emulator's adapter is no candidate for the full model
        )
        federated = federated_finetune(config=on_emulator, prepare_data=False)
        on_full = _update(config, peft={"layers": plan.full_adaptors})
        plugged = str(run / "full_adapter.safetensors")
        save_state(plug_in(load_state(run / "federated" / "final_adapter.safetensors"), plan), plugged)
        untuned = str(run / "full_untuned.safetensors")
        save_state(initial_adapter_state(on_full)[0], untuned)
        full = evaluate(on_full, plugged, "full-plugged-in")
        before = evaluate(on_full, untuned, "full-untuned")
        artifact = log_adapter(config, run_id, plugged, "adapters/full")
    summary: dict[str, Any] = {
        "method": "offsite_tuning",
        "emulator_test_loss": federated["test_loss"],
        "emulator_test_accuracy": federated["test_accuracy"],
        "full_test_loss": full["test_loss"],
        "full_test_accuracy": full.get("test_accuracy"),
        "full_untuned_test_loss": before["test_loss"],
        "full_untuned_test_accuracy": before.get("test_accuracy"),
        "emulator_gap_test_loss": full["test_loss"] - federated["test_loss"],
        "emulator_distill_steps": distill_steps,
        **{f"emulator_distill_{k}": v for k, v in distilled.items()},
        "full_layers": plan.full_layers,
        "emulator_layers": len(plan.kept),
        "adaptor_layers_full": plan.full_adaptors,
        "full_parameters": plan.full_parameters,
        "client_visible_parameters": plan.emulator_parameters,
        "client_visible_share": plan.emulator_parameters / plan.full_parameters,
        "bytes_up_per_client_round": federated["bytes_up_per_client_round"],
        "federated_mlflow_run_id": federated["mlflow_run_id"],
        "adapter_artifact": artifact,
        "wall_seconds": time.perf_counter() - started,
        "mlflow_run_id": run_id,
    }
    finish_tracking(config, run_id, summary)
    write_outputs(Path(run), summary, [full, before])
    logger.info(
        "offsite-tuning: emulator test loss %.4f, full model with the plugged-in adaptors %.4f (untuned %.4f); "
        "clients saw %.0f%% of the parameters",
        summary["emulator_test_loss"],
        summary["full_test_loss"],
        summary["full_untuned_test_loss"],
        100 * summary["client_visible_share"],
    )
    return summary
