"""Update compression: unbiased quantization within one level, top-k with error feedback that
loses nothing, the real wire bytes, and a federated run with each method."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from fedtune.config.schema import ConfigError, build_config
from fedtune.model.adapters import load_state, to_bytes
from fedtune.round.compression import CompressionError, compress, decompress
from tests.conftest import tiny_overrides


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(64, 33, generator=g) * 0.01, "b": torch.randn(7, generator=g)}


@pytest.mark.parametrize(("method", "bits"), [("int8", 8), ("int4", 4)])
def test_quantization_is_within_one_level_and_unbiased(method: str, bits: int) -> None:
    update = _update()
    generator = torch.Generator().manual_seed(1)
    runs = []
    for _ in range(400):
        sent, residual = compress(update, method, fraction=0.0, generator=generator)
        assert residual == {}
        runs.append(decompress(sent, update))
    for key, x in update.items():
        level = float(x.abs().max()) / (2 ** (bits - 1) - 1)
        assert all(float((r[key] - x).abs().max()) <= level * (1 + 1e-6) for r in runs)
        mean = torch.stack([r[key] for r in runs]).mean(0)
        assert float((mean - x).abs().max()) < 0.2 * level  # stochastic rounding: right on average


@pytest.mark.parametrize(("method", "at_most"), [("int8", 0.27), ("int4", 0.15), ("topk", 0.03)])
def test_the_wire_bytes_shrink(method: str, at_most: float) -> None:
    update = {"w": torch.randn(256, 256)}
    sent, _ = compress(update, method, fraction=0.01, generator=torch.Generator().manual_seed(0))
    assert len(to_bytes(sent)) <= at_most * len(to_bytes(update))


def test_topk_with_error_feedback_delays_but_never_loses() -> None:
    """Over rounds, what was sent plus what is still held equals the sum of the true updates."""
    residual: dict[str, torch.Tensor] = {}
    sent_total = {k: torch.zeros_like(v) for k, v in _update().items()}
    true_total = {k: torch.zeros_like(v) for k, v in _update().items()}
    for round_ in range(5):
        update = _update(round_)
        target = {k: v + residual.get(k, 0) for k, v in update.items()}
        sent, residual = compress(target, "topk", fraction=0.05, generator=torch.Generator())
        decoded = decompress(sent, update)
        for k in update:
            assert int((decoded[k] != 0).sum()) <= max(1, round(0.05 * update[k].numel()) + 1)
            sent_total[k] += decoded[k]
            true_total[k] += update[k]
    for k in true_total:
        assert torch.allclose(sent_total[k] + residual[k], true_total[k], atol=1e-6)


def test_malformed_payloads_are_refused() -> None:
    reference = {"w": torch.zeros(4)}
    with pytest.raises(CompressionError, match="indices do not fit"):
        decompress({"idx/w": torch.tensor([9], dtype=torch.int32), "val/w": torch.tensor([1.0])}, reference)
    with pytest.raises(CompressionError, match="malformed"):
        decompress({"q8/w": torch.zeros(4, dtype=torch.int8)}, reference)  # no scale
    with pytest.raises(CompressionError, match="not in the payload"):
        decompress({"q8/x": torch.zeros(4, dtype=torch.int8), "scale/x": torch.ones(1)}, reference)


def test_compression_and_secure_aggregation_are_refused_together() -> None:
    with pytest.raises(ConfigError, match="compression.method: secure aggregation"):
        build_config({"compression": {"method": "int8"}, "secagg": {"enabled": True}})


@pytest.mark.parametrize("method", ["int8", "int4", "topk"])
def test_a_compressed_federation_learns_and_sends_less(tmp_path: Path, tiny_model_dir: Path, method: str) -> None:
    from flows.federated_finetune import federated_finetune

    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["federation"] |= {"rounds": 2, "clients_per_round": 2}
    overrides["eval"] |= {"generation_samples": 0}
    overrides["compression"] = {"method": method, "topk_fraction": 0.1}
    config = build_config(overrides)
    summary = federated_finetune(config=config)
    out = Path(config.federation.output_dir)
    plain = len(to_bytes(load_state(out / "final_adapter.safetensors")))
    sizes = [p.stat().st_size for p in (out / "rounds").rglob("update_client_*.safetensors")]
    assert sizes and max(sizes) < 0.5 * plain  # the files that travel are the compressed ones
    with (out / "rounds.csv").open() as handle:
        losses = [float(row["test_loss"]) for row in csv.DictReader(handle)]
    assert summary["test_loss"] == pytest.approx(losses[-1]) and losses[-1] < losses[0]  # it still learns
