"""FedProx: the proximal term by hand, and its effect on real client updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.config.schema import build_config
from fedtune.model.adapters import l2_norm, load_state
from fedtune.strategies.fedprox import FedProx
from tests.conftest import tiny_overrides


def test_the_proximal_term_and_its_gradient_by_hand() -> None:
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    b = torch.nn.Parameter(torch.tensor([0.25]))
    anchor = {"m.lora_A.weight": torch.tensor([[0.0, -1.0], [0.5, 1.0]]), "m.lora_B.weight": torch.tensor([1.25])}
    term = FedProx(mu=0.3).local_objective(anchor, {})
    loss = term.extra_loss({"m.lora_A.weight": w, "m.lora_B.weight": b})
    assert loss is not None
    assert loss.item() == pytest.approx(0.5 * 0.3 * (1 + 1 + 0 + 4 + 1))  # (mu/2) ||w - w_global||^2
    loss.backward()
    assert torch.allclose(w.grad, 0.3 * (w.detach() - anchor["m.lora_A.weight"]))
    assert torch.allclose(b.grad, 0.3 * (b.detach() - anchor["m.lora_B.weight"]))


def test_weights_that_do_not_match_the_global_adapter_are_named() -> None:
    term = FedProx(mu=0.1).local_objective({"x.lora_A.weight": torch.zeros(1)}, {})
    with pytest.raises(ValueError, match="fedprox: .*differ"):
        term.extra_loss({"y.lora_A.weight": torch.zeros(1)})


def test_mu_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"federation.strategy_options.mu: fedprox: .*greater than 0"):
        build_config({"federation": {"strategy": "fedprox", "strategy_options": {"mu": 0}}})
    with pytest.raises(ValueError, match="greater than 0"):
        FedProx(mu=0)


def _update_norms(root: Path, model_dir: Path, **federation: object) -> list[float]:
    from flows.federated_finetune import federated_finetune

    overrides = tiny_overrides(root, model_dir)
    overrides["federation"] |= {"rounds": 1, "clients_per_round": 3, **federation}
    overrides["eval"] |= {"generation_samples": 0}
    config = build_config(overrides)
    federated_finetune(config=config)
    folder = Path(config.federation.output_dir) / "rounds" / "round_0001"
    return [l2_norm(load_state(folder / f"update_client_{c}.safetensors")) for c in range(3)]


def test_a_strong_proximal_term_keeps_every_client_closer_to_the_global_adapter(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    free = _update_norms(tmp_path / "fedavg", tiny_model_dir, strategy="fedavg")
    held = _update_norms(tmp_path / "fedprox", tiny_model_dir, strategy="fedprox", strategy_options={"mu": 50.0})
    assert all(h < 0.8 * f for h, f in zip(held, free, strict=True)), (held, free)
