"""Reads KServe manifests into KServe's own Python models (kserve.models, with the Kubernetes client's
models for the core types inside them, such as V1Container), refusing what those models would drop
or coerce: an unknown field, a value of the wrong type, a missing required field. Offline: no
cluster, no CRD download. (kserve's ApiClient cannot do it: it looks every type up in kserve.models
alone, and silently drops unknown fields.)"""

from __future__ import annotations

import re
from typing import Any

import kserve.models
import kubernetes.client.models

PRIMITIVES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


class ManifestError(ValueError):
    pass


def build(data: Any, kind: str, where: str = "") -> Any:
    """`data` (parsed YAML) as the model `kind` (e.g. "V1beta1InferenceService"); ManifestError says where it fails."""
    if kind == "object":
        return data
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", kind):
        _expect(data, list, kind, where)
        return [build(item, match.group(1), f"{where}[{i}]") for i, item in enumerate(data)]
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", kind):
        _expect(data, dict, kind, where)
        inner = match.group(1) or match.group(2)  # kserve's spelling, then the Kubernetes client's
        return {key: build(value, inner, f"{where}.{key}") for key, value in data.items()}
    if kind in PRIMITIVES:
        if isinstance(data, bool) and kind != "bool":  # bool is an int to Python, not to Kubernetes
            raise ManifestError(f"{where}: expected {kind}, got {data!r}")
        _expect(data, PRIMITIVES[kind], kind, where)
        return data
    model = getattr(kserve.models, kind, None) or getattr(kubernetes.client.models, kind)
    _expect(data, dict, kind, where)
    fields = {json_name: attribute for attribute, json_name in model.attribute_map.items()}
    if unknown := sorted(set(data) - set(fields)):
        raise ManifestError(f"{where or kind}: no field {', '.join(unknown)} in {kind}")
    values = {fields[name]: build(value, model.openapi_types[fields[name]], f"{where}.{name}")
              for name, value in data.items()}  # fmt: skip
    try:
        return model(**values)
    except ValueError as exc:  # the model's own checks: required fields, allowed values
        raise ManifestError(f"{where or kind}: {exc}") from exc


def _expect(data: Any, types: type | tuple[type, ...], kind: str, where: str) -> None:
    if not isinstance(data, types):
        raise ManifestError(f"{where}: expected {kind}, got {type(data).__name__} {data!r}")
