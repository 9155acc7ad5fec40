"""A pipeline's options as the HTTP adapters take them: /v1's query string and body, /v2's
parameters, validated together into the pipeline's one options model; and their OpenAPI view."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from service.pipeline import Opts


def parse_options(cls: type[Opts], query: dict[str, Any], body: dict[str, Any]) -> Opts:
    """Query-string options overlaid by the body's (a form field or JSON key wins), validated together."""
    try:
        return cls.model_validate({**query, **body})
    except ValidationError as exc:
        errors = [{**e, "loc": ("body" if e["loc"][:1] and e["loc"][0] in body else "query", *e["loc"])}
                  for e in exc.errors(include_url=False)]  # fmt: skip
        raise RequestValidationError(errors) from exc


def query_parameters(cls: type[BaseModel]) -> list[dict[str, Any]]:
    """The options model as OpenAPI query parameters (every one optional: each has a default)."""
    schema = cls.model_json_schema()
    return [
        {"name": name, "in": "query", "required": False, "schema": {k: v for k, v in prop.items() if k != "title"},
         "description": prop.get("description", "")}
        for name, prop in schema["properties"].items()
    ]  # fmt: skip
