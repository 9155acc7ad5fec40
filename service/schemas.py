"""Small shared response types."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# two numbers, as a JSON array (not a tuple: OpenAPI 3.1 has no valid schema for pydantic's tuples here)
Pair = Annotated[list[int], Field(min_length=2, max_length=2)]
FloatPair = Annotated[list[float], Field(min_length=2, max_length=2)]
