"""What a client reports about its round, typed: the coordinator reads nothing else of it.

A client's code builds one (`fedtune.round.client.train_client`); where a report crosses a trust
boundary (a deployed client's published `report.json`) the coordinator parses it with
`ClientReport.from_row`, so a malformed or mislabelled report drops that client with the reason
instead of breaking the round. `row()` is the flat form the round's history, checkpoints and
MLflow logging keep (the features' fields beside the fixed ones).
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

FEATURE_FIELD = r"^[a-z][a-z0-9_]{0,63}$"


class ReportRejected(ValueError):
    pass


class ClientReport(BaseModel):
    # strict: a report is read as sent (no "0" for 0, no true for 1); timings and features finite
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    client: int = Field(ge=0)
    round: int = Field(ge=1)
    num_examples: int = Field(gt=0, description="Train examples after tokenization: the update's weight.")
    bytes_up: int = Field(ge=0, description="Bytes of the update file as sent.")
    bytes_down: int = Field(ge=0, description="Bytes of the global adapter received.")
    train_loss: float
    train_loss_first: float
    train_loss_last: float
    val_loss: float | None = Field(description="None when the client's val split kept no example.")
    steps: int = Field(ge=0)
    tokens: int = Field(ge=0)
    seconds: float = Field(ge=0, allow_inf_nan=False)
    val_seconds: float = Field(ge=0, allow_inf_nan=False)
    features: dict[str, float] = Field(default_factory=dict, description="Fields the client's features add.")
    update_path: str | None = Field(None, description="Where the coordinator reads the update (None: masked).")
    data_version: str | None = Field(None, description="The client's partition version (deployment lineage).")

    @field_validator("features")
    @classmethod
    def _named_numbers(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k in value if not re.match(FEATURE_FIELD, k) or k in cls.model_fields]
        if bad:
            raise ValueError(f"feature fields {bad[:3]} are not plain lower-case names apart from the fixed ones")
        infinite = [k for k, v in value.items() if not math.isfinite(v)]
        if infinite:  # a deployed client's NaN would otherwise reach the history and MLflow
            raise ValueError(f"feature fields {infinite[:3]} are not finite numbers")
        return value

    def row(self) -> dict[str, Any]:
        """The flat form: fixed fields (those set) and the features' fields side by side."""
        fixed = self.model_dump(exclude={"features"}, exclude_none=True)
        return {**fixed, **self.features}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ClientReport:
        """Parse a flat report (fields outside the fixed ones are the features'); ReportRejected
        names every problem."""
        if not isinstance(row, dict):
            raise ReportRejected(f"a report is a JSON object, not {type(row).__name__}")
        fixed = {k: v for k, v in row.items() if k in cls.model_fields and k != "features"}
        try:
            return cls.model_validate({**fixed, "features": {k: v for k, v in row.items() if k not in fixed}})
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise ReportRejected(f"malformed report ({problems})") from None
