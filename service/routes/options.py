"""A pipeline's options as the HTTP adapters take them: /v1's query string and body, /v2's
parameters, validated together into the pipeline's one options model; and their OpenAPI view.

Unknown options are refused by name: the first few named (service.text.LISTED_ITEMS, each cut to
QUOTED_CHARS) with their count, found by set operations, so 290,000 unknown names cost a few
milliseconds and come back as a few hundred bytes, not as one error each."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import QueryParams

from service.pipeline import Opts
from service.text import LISTED_ITEMS

UNKNOWN = "Extra inputs are not permitted"  # pydantic's own words for it


class InvalidOptions(RequestValidationError):
    """A request's validation errors: the first LISTED_ITEMS of them, and their total count."""

    def __init__(self, errors: Sequence[Any], total: int) -> None:
        super().__init__(list(errors[:LISTED_ITEMS]))
        self.total = max(total, len(self.errors()))


def validate_options(cls: type[Opts], values: Mapping[str, Any], where: Callable[[str], str]) -> Opts:
    """`values` validated into `cls`; else InvalidOptions, its errors located at `where(name)`
    ("body", "query", "parameters"): the known options' errors, then the unknown names in the
    order sent."""
    fields = cls.model_fields
    unknown = len(values.keys() - fields.keys()) if cls.model_config.get("extra") == "forbid" else 0
    known = values if not unknown else {name: values[name] for name in fields if name in values}
    errors: list[dict[str, Any]] = []
    try:
        options = cls.model_validate(known)
    except ValidationError as exc:  # at most a few per field: no option is a list
        errors = [{**e, "loc": (where(str(e["loc"][0])) if e["loc"] else "body", *e["loc"])}
                  for e in exc.errors(include_url=False)]  # fmt: skip
    else:
        if not unknown:
            return options
    total = len(errors) + unknown
    names = (name for name in values if name not in fields)
    errors += [{"loc": (where(name), name), "msg": UNKNOWN, "type": "extra_forbidden"}
               for name, _ in zip(names, range(LISTED_ITEMS), strict=False)]  # fmt: skip
    raise InvalidOptions(errors, total)


def query_options(query: QueryParams) -> dict[str, Any]:
    """The query string's options: a key given more than once, its values as a list (as a form's
    repeated field: zero-shot's labels take one, any other option refuses it), never its last alone."""
    values: dict[str, list[str]] = {}
    for key, value in query.multi_items():
        values.setdefault(key, []).append(value)
    return {key: found[0] if len(found) == 1 else found for key, found in values.items()}


def parse_options(cls: type[Opts], query: dict[str, Any], body: dict[str, Any]) -> Opts:
    """Query-string options overlaid by the body's (a form field or JSON key wins), validated together."""
    return validate_options(cls, {**query, **body}, lambda name: "body" if name in body else "query")


def query_parameters(cls: type[BaseModel]) -> list[dict[str, Any]]:
    """The options model as OpenAPI query parameters (every one optional: each has a default)."""
    schema = cls.model_json_schema()
    return [
        {"name": name, "in": "query", "required": False, "schema": {k: v for k, v in prop.items() if k != "title"},
         "description": prop.get("description", "")}
        for name, prop in schema["properties"].items()
    ]  # fmt: skip
