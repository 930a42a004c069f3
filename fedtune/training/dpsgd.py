"""The DP-SGD step (Abadi et al. 2016, Algorithm 1) through Opacus: Poisson-sampled batches,
per-example gradients clipped to `max_grad_norm`, Gaussian noise of std `noise_multiplier *
max_grad_norm`. The budget it spends is `fedtune.privacy.record_dp`'s ledger."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedtune.config.schema import RecordDPSection


class DPSGD:
    """Opacus per-example clipping and noise around one round's optimizer; `close` unhooks."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: RecordDPSection, batch_size: int, seed: int
    ) -> None:
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=cfg.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=torch.Generator().manual_seed(seed % (1 << 63)),
        )

    @staticmethod
    def sample_rate(batch_size: int, examples: int) -> float:
        return min(1.0, batch_size / examples)

    def step(self, batch: Any, per_example_loss: Callable[[Any], torch.Tensor]) -> float | None:
        """One DP-SGD step on a Poisson-sampled batch; an empty one (None) takes a noise-only step."""
        loss = None
        if batch is not None:
            losses = per_example_loss(batch)
            with warnings.catch_warnings():  # frozen inputs: Opacus' hooks see output gradients, as intended
                warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                losses.mean().backward()
            loss = float(losses.detach().mean())
        else:
            for p in self.params:  # Opacus' empty-batch path: zero per-example gradients
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def close(self) -> None:
        self.module._close()  # removes the hooks and the per-example gradient buffers


def poisson_sample(data: list[Any], rate: float, generator: torch.Generator) -> list[Any]:
    """Each example independently with probability `rate` (what the accountant assumes)."""
    picked = torch.rand(len(data), generator=generator) < rate
    return [data[i] for i in picked.nonzero().flatten().tolist()]
