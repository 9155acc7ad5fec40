"""deploy/k8s/ validated offline: the core kinds against Kubernetes' own JSON schemas
(kubernetes-validate, strict: an unknown field fails), the KServe objects through KServe's Python
models (tests/deploy/kserve_models.py); then what no schema knows: the probes, port, metric and
drain match the service, and the GPU variant differs from the CPU one only where it must."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.metrics import Metrics
from service.settings import PROJECT_ROOT, Settings
from tests.deploy.kserve_models import ManifestError, build

K8S = PROJECT_ROOT / "deploy" / "k8s"
CORE = [*sorted(K8S.glob("*.yaml")), K8S / "gpu" / "deployment.yaml"]
KSERVE = K8S / "kserve" / "inferenceservice.yaml"
KSERVE_MODELS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]  # the oldest still common, and the newest


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def one(path: Path) -> dict[str, Any]:
    (doc,) = documents(path)
    return doc


def validate_core(doc: dict[str, Any]) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def validate_kserve(doc: dict[str, Any]) -> Any:
    return build(doc, KSERVE_MODELS[doc["apiVersion"], doc["kind"]])


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (found,) = deployment["spec"]["template"]["spec"]["containers"]
    return found


def env(container: dict[str, Any]) -> dict[str, str]:
    return {var["name"]: var["value"] for var in container["env"]}


def test_the_core_kinds_are_all_there() -> None:
    kinds = sorted(doc["kind"] for path in CORE for doc in documents(path))
    assert kinds == ["Deployment", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(K8S)))
def test_core_manifests_validate(path: Path) -> None:
    for doc in documents(path):
        validate_core(doc)


def test_kserve_manifests_validate() -> None:
    runtime, service = (validate_kserve(doc) for doc in documents(KSERVE))
    assert service.spec.predictor.model.runtime == runtime.metadata.name
    assert service.spec.predictor.model.protocol_version == "v2" and "v2" in runtime.spec.protocol_versions
    assert service.spec.predictor.model.model_format.name in {f.name for f in runtime.spec.supported_model_formats}


def broken(doc: dict[str, Any], path: list[str | int], value: Any = None, *, delete: bool = False) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]  # type: ignore[index]
    if delete:
        del parent[path[-1]]  # type: ignore[arg-type]
    else:
        parent[path[-1]] = value  # type: ignore[index]
    return doc


POD = ["spec", "template", "spec"]
CONTAINER = [*POD, "containers", 0]


@pytest.mark.parametrize(
    ("where", "value", "delete"),
    [
        ([*CONTAINER, "readinesProbe"], {"httpGet": {"path": "/health/ready", "port": "http"}}, False),  # a typo
        ([*CONTAINER, "ports", 0, "containerPort"], "8000", False),  # a string for a number
        ([*POD, "terminationGracePeriodSeconds"], "40s", False),
        ([*CONTAINER, "name"], None, True),  # a required field
        (["spec", "selector"], None, True),
    ],
)
def test_a_broken_deployment_fails(where: list[str | int], value: Any, delete: bool) -> None:
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(broken(one(K8S / "deployment.yaml"), where, value, delete=delete))


@pytest.mark.parametrize(
    ("doc", "where", "value", "delete"),
    [
        (1, ["spec", "predictor", "model", "protocolVerion"], "v2", False),
        (1, ["spec", "predictor", "minReplicas"], "2", False),
        (1, ["spec", "predictor", "model", "modelFormat"], None, True),
        (0, ["spec", "containers", 0, "name"], None, True),
        (0, ["spec", "containers", 0, "ports", 0, "containerPort"], "8000", False),
        (0, ["spec", "containers", 0, "readinessProbe", "httpGet", "pth"], "/", False),
    ],
)
def test_a_broken_kserve_manifest_fails(doc: int, where: list[str | int], value: Any, delete: bool) -> None:
    with pytest.raises(ManifestError):
        validate_kserve(broken(documents(KSERVE)[doc], where, value, delete=delete))


def deployments() -> list[dict[str, Any]]:
    return [one(K8S / "deployment.yaml"), one(K8S / "gpu" / "deployment.yaml")]


def kserve_runtime_container() -> dict[str, Any]:
    (found,) = documents(KSERVE)[0]["spec"]["containers"]
    return found


def test_probes_and_port_are_the_services() -> None:
    app = TestClient(create_app(Settings()))  # no lifespan: the routes, not the models

    def routed(path: str) -> bool:
        return app.get(path).status_code != 404  # /health/ready is 503 here: nothing loaded

    port, grpc_port = Settings().port, Settings().grpc_port
    for deployment in deployments():
        served = container(deployment)
        assert served["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"},
                                   {"name": "grpc", "containerPort": grpc_port, "protocol": "TCP"}]  # fmt: skip
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert routed(served[probe]["httpGet"]["path"])
        assert served["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        assert served["livenessProbe"]["httpGet"]["path"] == "/health/live"
    runtime = kserve_runtime_container()
    assert runtime["ports"][0]["containerPort"] == port
    assert all(routed(runtime[p]["httpGet"]["path"]) for p in ("readinessProbe", "livenessProbe"))
    service = one(K8S / "service.yaml")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_the_grace_period_covers_prestop_drain_and_grace() -> None:
    for deployment in deployments():
        served = container(deployment)
        settings = env(served)
        prestop = float(served["lifecycle"]["preStop"]["exec"]["command"][1])
        needed = prestop + float(settings["VITSERVE_SHUTDOWN_DRAIN_S"]) + float(settings["VITSERVE_SHUTDOWN_GRACE_S"])
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= needed
        Settings(**{k.removeprefix("VITSERVE_").lower(): v for k, v in settings.items()})  # the service takes them
    assert (
        env(kserve_runtime_container()).items()
        >= {k: v for k, v in env(container(deployments()[0])).items() if k.startswith("VITSERVE_SHUTDOWN")}.items()
    )


def test_selectors_and_names_meet() -> None:
    deployment = one(K8S / "deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(K8S / "service.yaml")["spec"]["selector"].items() <= labels.items()
    assert one(K8S / "pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = one(K8S / "hpa.yaml")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"]  # the HPA owns the count


def test_the_hpa_scales_on_a_metric_the_service_exports() -> None:
    exported = {metric.name for metric in Metrics().registry.collect()}
    (pods,) = [m["pods"] for m in one(K8S / "hpa.yaml")["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods["metric"]["name"] in exported
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    assert rule["seriesQuery"].startswith(pods["metric"]["name"] + "{")
    assert rule["name"]["as"] == pods["metric"]["name"]


def test_the_gpu_variant_differs_only_where_it_must() -> None:
    cpu, gpu = deployments()
    assert gpu["spec"]["template"]["spec"].pop("tolerations")
    assert container(gpu)["resources"]["limits"].pop("nvidia.com/gpu") == "1"
    assert (container(cpu).pop("image"), container(gpu).pop("image")) == ("vitserve:cpu", "vitserve:gpu")
    assert (env(container(cpu))["VITSERVE_DEVICE"], env(container(gpu))["VITSERVE_DEVICE"]) == ("cpu", "cuda")
    for deployment in (cpu, gpu):
        served = container(deployment)
        served["env"] = [var for var in served["env"] if var["name"] != "VITSERVE_DEVICE"]
        served.pop("resources")
    assert cpu == gpu
