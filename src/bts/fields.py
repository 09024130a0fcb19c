"""Constrained field types shared by every config section (validated at the edge, by pydantic).

Integers are strict, so YAML's `true` is not taken as 1; floats refuse booleans, NaN and
infinities, so `lr: .nan` fails while the config is read, not halfway through training.
"""

from __future__ import annotations

from typing import Annotated

import pydantic


def _no_bool(value):
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


Count = Annotated[int, pydantic.Strict(), pydantic.Field(ge=0)]
PositiveCount = Annotated[int, pydantic.Strict(), pydantic.Field(gt=0)]
Float = Annotated[float, pydantic.BeforeValidator(_no_bool), pydantic.Field(allow_inf_nan=False)]
PositiveFloat = Annotated[Float, pydantic.Field(gt=0)]
NonNegativeFloat = Annotated[Float, pydantic.Field(ge=0)]
