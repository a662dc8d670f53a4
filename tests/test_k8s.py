"""The Kubernetes manifests render with kustomize, pass schema validation, and agree with the server:
their settings parse with the server's own parser, probes hit its health service on its port."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from flux2_encoder_server.server import LIVENESS_SERVICE
from flux2_encoder_server.settings import Settings
from flux2split_proto import SERVICE_NAME

K8S = Path(__file__).resolve().parent.parent / "k8s"
KUSTOMIZATIONS = [K8S / "base", *sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())]
KUBERNETES_VERSION = "1.32.0"

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) is needed to render k8s/"
)


def render(path: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifests_validate_against_kubernetes_schema(path):
    docs = render(path)
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= {d["kind"] for d in docs}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_deployment_agrees_with_the_server(path):
    docs = render(path)
    (deployment,) = by_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind(docs, "ConfigMap")}
    environ: dict[str, str] = {}
    for source in container.get("envFrom", []):
        environ.update(configmaps[source["configMapRef"]["name"]])
    assert container["args"][0] == "serve"
    settings = Settings.from_cli(container["args"][1:], environ)  # the server's own parser accepts them

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == settings.port
    assert ports["http"] == settings.http_port
    assert ports["metrics"] == settings.metrics_port
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert settings.auth_tokens_file is not None
    assert str(Path(settings.auth_tokens_file).parent) in mounts, "the tokens file must be mounted"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.port
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    # Liveness must not fail while the model loads or the pod drains: the server's `liveness` service.
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.grace_period_s + pre_stop

    for service in by_kind(docs, "Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (
                f"{service['metadata']['name']} targets unknown port {port['targetPort']}"
            )
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_autoscaler_metric_is_exported_by_the_server():
    from flux2_encoder_server.metrics import Metrics

    exported = {metric.name for metric in Metrics().registry.collect()}
    for path in KUSTOMIZATIONS:
        for hpa in by_kind(render(path), "HorizontalPodAutoscaler"):
            for metric in hpa["spec"]["metrics"]:
                assert metric["pods"]["metric"]["name"] in exported
