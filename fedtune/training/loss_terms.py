"""Terms a client adds to its training loss (FedProx's proximal term, SCAFFOLD's correction, an
owner's watermark), each a function of the trainable parameters keyed as the adapter state is."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class LocalObjective:
    """Extra terms added to a client's loss; the default adds nothing."""

    def extra_loss(self, named_params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """A term added to the loss; `named_params` are the trainable parameters keyed as the
        adapter state is (`fedtune.model.adapters.trainable_parameters`)."""
        return None


class Terms(LocalObjective):
    """Several features' loss terms, summed."""

    def __init__(self, *parts: LocalObjective) -> None:
        self.parts = parts

    def extra_loss(self, named_params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        terms = [t for t in (part.extra_loss(named_params) for part in self.parts) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None
