"""The Kubernetes manifests and the server image agree with the server.

Every kustomization in k8s/ renders with kustomize and passes schema validation (built-in kinds against
the Kubernetes 1.32 schema, custom resources against their published schemas); its settings parse with
the server's own parser, probes ask the server's health service on its port, the model cache holds the
folder the server reads, the autoscaler's metric is exported and served by the adapter rule, and the
external routes reach the server's ports. The Dockerfile is checked statically (no container engine here).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from flux2_encoder_server.server import LIVENESS_SERVICE
from flux2_encoder_server.settings import Settings
from flux2split_proto import SERVICE_NAME

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.32.0"
# Custom resources: not in the Kubernetes schema; k8s/crd-schemas/validate.mjs checks them.
CRD_GROUPS = {"gateway.networking.k8s.io", "monitoring.coreos.com"}
CRD_VALIDATOR = K8S / "crd-schemas"


def _kustomizations() -> list[Path]:
    found = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if "node_modules" in path.parts:
            continue
        if yaml.safe_load(path.read_text()).get("kind") == "Component":  # only built as part of an overlay
            continue
        found.append(path.parent)
    return found


KUSTOMIZATIONS = _kustomizations()
MODEL_CACHE = K8S / "model-cache"
# Each fleet renders one encoder Deployment; a fleet whose models differ from k8s/model-cache's has a
# model-cache kustomization of its own beside it.
FLEETS = [k for k in KUSTOMIZATIONS if k.name != "model-cache"]


def model_cache_of(fleet: Path) -> Path:
    return fleet / "model-cache" if (fleet / "model-cache").is_dir() else MODEL_CACHE


def filled_models(fill: dict) -> dict[str, tuple[str, str]]:
    """The fill Job's MODELS: {folder: (repo, revision)}."""
    (models,) = [e["value"] for e in fill["env"] if e["name"] == "MODELS"]
    lines = [line.split() for line in models.splitlines() if line.strip()]
    assert all(len(parts) == 3 for parts in lines), models
    return {folder: (repo, revision) for repo, revision, folder in lines}


def ids(path: Path) -> str:
    return str(path.relative_to(K8S))


needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) is needed to render k8s/"
)


@functools.cache
def render(path: Path) -> tuple[dict, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def by_kind(docs: tuple[dict, ...], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: tuple[dict, ...], kind: str) -> dict:
    (doc,) = by_kind(docs, kind)
    return doc


def group_of(doc: dict) -> str:
    return doc["apiVersion"].rpartition("/")[0]


def server_settings(docs: tuple[dict, ...]) -> tuple[dict, dict, Settings]:
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind(docs, "ConfigMap")}
    environ: dict[str, str] = {}
    for source in container.get("envFrom", []):
        environ.update(configmaps[source["configMapRef"]["name"]])
    assert container["args"][0] == "serve"
    return deployment, container, Settings.from_cli(container["args"][1:], environ)  # the server's own parser


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and selector.items() <= labels.items()


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=ids)
def test_manifests_validate_against_kubernetes_schema(path):
    docs = render(path)
    for doc in docs:
        if group_of(doc) in CRD_GROUPS:
            continue  # test_custom_resources_validate_against_their_published_schemas
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    if path in FLEETS:
        assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= {d["kind"] for d in docs}


@needs_kubectl
def test_custom_resources_validate_against_their_published_schemas():
    custom = [doc for path in KUSTOMIZATIONS for doc in render(path) if group_of(doc) in CRD_GROUPS]
    assert {"ServiceMonitor", "Gateway", "GRPCRoute", "HTTPRoute"} <= {d["kind"] for d in custom}
    if shutil.which("node") is None or not (CRD_VALIDATOR / "node_modules").is_dir():
        message = "the custom-resource schemas are not installed: run `make k8s-crd-schemas` (needs node and npm)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them through `make test`; never let a missing step pass
        pytest.skip(message)
    proc = subprocess.run(
        ["node", "validate.mjs"], cwd=CRD_VALIDATOR, input=json.dumps(custom), capture_output=True, text=True
    )
    assert proc.stdout, proc.stderr
    results = json.loads(proc.stdout)
    errors = [f"{r['kind']}/{r['name']}: {r['error']}" for r in results if r["error"]]
    assert not errors and proc.returncode == 0, errors or proc.stderr


@needs_kubectl
@pytest.mark.parametrize("path", FLEETS, ids=ids)
def test_deployment_agrees_with_the_server(path):
    docs = render(path)
    deployment, container, settings = server_settings(docs)
    pod = deployment["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == settings.port
    assert ports["http"] == settings.http_port
    assert ports["metrics"] == settings.metrics_port
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert settings.auth_tokens_file is not None
    assert str(Path(settings.auth_tokens_file).parent) in mounts, "the tokens file must be mounted"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.port
    # Readiness (and startup) follow the TextEncoder service, which turns NOT_SERVING while draining;
    # liveness follows the engine only, so a draining or busy pod is taken out of service, never killed.
    assert container["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.grace_period_s + pre_stop

    for service in by_kind(docs, "Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (
                f"{service['metadata']['name']} targets unknown port {port['targetPort']}"
            )
        assert selects(service["spec"]["selector"], pod["metadata"]["labels"])


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity in bytes (the binary suffixes the manifests use, or plain bytes)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


@needs_kubectl
@pytest.mark.parametrize("path", FLEETS, ids=ids)
def test_the_pod_holds_the_front_end_processes(path):
    """With --frontends the answers cross a memfd ring of --max-inflight-bytes, which the kernel charges to
    the pod's memory cgroup (docs/operations.md, "Front-end processes"): the limit must hold it beside the model
    process, or the pod is OOM-killed under load instead of being refused at start."""
    _, container, settings = server_settings(render(path))
    resources = container["resources"]
    limit = quantity_bytes(resources["limits"]["memory"])
    request = quantity_bytes(resources["requests"]["memory"])
    assert limit >= request
    if settings.frontends:
        ring = settings.max_inflight_bytes
        # The model process's own host memory: ~5 GiB per bf16 encoder after a fast start (docs/benchmarks.md);
        # 16 GiB leaves room for two models and the loader's read-ahead.
        assert limit - ring >= 16 << 30, f"memory limit {resources['limits']['memory']} beside a {ring >> 30} GiB ring"
        # One core for the model process, and a share for each front-end (at 32 clients on an H200 the whole
        # server used 1-3.5 cores).
        assert float(resources["requests"]["cpu"]) >= 2


@needs_kubectl
@pytest.mark.parametrize("path", FLEETS, ids=ids)
def test_replicas_spread_over_nodes_and_zones_within_a_disruption_budget(path):
    docs = render(path)
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    spread = {c["topologyKey"]: c for c in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]}
    assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= spread.keys()
    for constraint in spread.values():
        assert selects(constraint["labelSelector"]["matchLabels"], labels), "spread must count this Deployment's pods"
        assert constraint["maxSkew"] == 1
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["maxUnavailable"] == 1


@needs_kubectl
@pytest.mark.parametrize("path", FLEETS, ids=ids)
def test_replicas_read_the_weights_the_model_cache_fills(path):
    docs = render(path)
    deployment, container, settings = server_settings(docs)
    pod = deployment["spec"]["template"]["spec"]
    cache = render(model_cache_of(path))
    job = one(cache, "Job")
    (fill,) = job["spec"]["template"]["spec"]["containers"]
    claim = one(cache, "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "the Job writes while replicas on other nodes read"
    assert not by_kind(docs, "PersistentVolumeClaim"), "the cache outlives the fleet: it is not part of it"
    assert deployment["metadata"]["namespace"] == job["metadata"]["namespace"] == claim["metadata"]["namespace"]
    assert fill["image"] == container["image"]

    def claim_mount(spec: dict, c: dict) -> dict:
        (volume,) = [v for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
        return {"path": mount["mountPath"], "read_only": mount.get("readOnly", False), "volume": volume}

    written = claim_mount(job["spec"]["template"]["spec"], fill)
    read = claim_mount(pod, container)
    filled = filled_models(fill)
    for spec in settings.models:  # the server's own parse of --model: every folder it reads is filled
        assert spec.source in filled, f"model {spec.name}: the Job does not fill {spec.source}"
        assert Path(spec.source).is_relative_to(read["path"])
    assert read["path"] == written["path"]
    assert read["read_only"] and read["volume"]["persistentVolumeClaim"].get("readOnly")
    assert not written["read_only"]
    # A replica that starts first waits for the Job's marker in each folder instead of reading a
    # half-written one (both scripts run in test_model_cache_scripts_fill_and_wait_for_every_folder).
    (wait,) = pod["initContainers"]
    marker = re.search(r'-f "\$dir/([^"]+)"', wait["args"][0])
    assert marker and marker.group(1) in fill["args"][0]
    assert wait["envFrom"] == container["envFrom"]


@needs_kubectl
def test_model_cache_scripts_fill_and_wait_for_every_folder(tmp_path):
    """The fill Job's script and the replicas' wait script, run by sh: the Job writes each MODELS folder's
    marker after its download (a stand-in `hf` on PATH records the calls); the wait returns once every folder
    of a two-model FLUX2_ENCODER_MODEL has its marker and keeps waiting, naming the folder, while one lacks it."""
    fleet = K8S / "overlays" / "h100-dev-and-klein"
    (fill,) = one(render(model_cache_of(fleet)), "Job")["spec"]["template"]["spec"]["containers"]
    (wait,) = one(render(fleet), "Deployment")["spec"]["template"]["spec"]["initContainers"]
    folders = {str(tmp_path / "m" / str(i)): (repo, rev) for i, (repo, rev) in enumerate(filled_models(fill).values())}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "hf").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "hf").chmod(0o755)
    models = "\n".join(f"{repo} {rev} {folder}" for folder, (repo, rev) in folders.items())
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MODELS": models}
    for folder in folders:
        Path(folder).mkdir(parents=True)  # `hf download --local-dir` creates it; the stand-in does not
    subprocess.run(["sh", "-c", fill["args"][0]], env=env, check=True, capture_output=True, timeout=30)
    assert len(calls.read_text().splitlines()) == len(folders) == 2
    assert all((Path(folder) / ".flux2-fill-complete").is_file() for folder in folders)

    first, second = folders
    served = f"flux2-dev={first},klein-4b={second}"
    wait_env = {"PATH": "/usr/bin:/bin", "FLUX2_ENCODER_MODEL": served}
    done = subprocess.run(["sh", "-c", wait["args"][0]], env=wait_env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    (Path(second) / ".flux2-fill-complete").unlink()
    with pytest.raises(subprocess.TimeoutExpired) as waiting:
        subprocess.run(["sh", "-c", wait["args"][0]], env=wait_env, capture_output=True, text=True, timeout=2)
    assert f"waiting for {second}" in (waiting.value.stdout or b"").decode()


@needs_kubectl
def test_autoscaler_metric_is_exported_by_the_server_and_served_by_the_adapter():
    from flux2_encoder_server.metrics import Metrics

    exported = {metric.name for metric in Metrics().registry.collect()}
    rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    checked = 0
    for path in FLEETS:
        docs = render(path)
        for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
            for metric in hpa["spec"]["metrics"]:
                name = metric["pods"]["metric"]["name"]
                assert name in exported
                served = [r for r in rules if _adapter_metric_name(r) == name]
                assert served, f"no prometheus-adapter rule serves {name}"
                assert re.match(rf"{name}\{{", served[0]["seriesQuery"]), "the rule reads the exported series"
                assert {"pod", "namespace"} <= served[0]["resources"]["overrides"].keys()
                checked += 1
            # Prometheus scrapes the port the server serves metrics on.
            _, container, settings = server_settings(docs)
            monitor = one(docs, "ServiceMonitor")
            (endpoint,) = monitor["spec"]["endpoints"]
            scraped = [
                port
                for service in by_kind(docs, "Service")
                if selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
                for port in service["spec"]["ports"]
                if port["name"] == endpoint["port"]
            ]
            assert [p["targetPort"] for p in scraped] == ["metrics"]
            assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == settings.metrics_port
    assert checked, "no HorizontalPodAutoscaler found in k8s/"


def _adapter_metric_name(rule: dict) -> str:
    """The name prometheus-adapter gives the series a rule selects (name.matches -> name.as)."""
    series = re.match(r"(\w+)", rule["seriesQuery"]).group(1)  # type: ignore[union-attr]
    naming = rule.get("name", {})
    template = naming.get("as", "${1}").replace("${", "\\g<").replace("}", ">")  # Go's ${1} is Python's \g<1>
    return re.sub(naming.get("matches", "^(.*)$"), template, series)


@needs_kubectl
def test_external_routes_reach_the_server_over_tls():
    examples = [docs for docs in map(render, FLEETS) if by_kind(docs, "Gateway")]
    assert examples, "no Gateway example found in k8s/"
    for docs in examples:
        _check_external_routes(docs)


def _check_external_routes(docs: tuple[dict, ...]) -> None:
    _, _, settings = server_settings(docs)
    service = next(s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None")
    service_port = {p["targetPort"]: p["port"] for p in service["spec"]["ports"]}
    gateway = one(docs, "Gateway")
    listeners = {listener["name"]: listener for listener in gateway["spec"]["listeners"]}
    for listener in listeners.values():
        assert listener["protocol"] == "HTTPS" and listener["tls"]["mode"] == "Terminate"

    grpc_route = one(docs, "GRPCRoute")
    services = {m["method"]["service"] for rule in grpc_route["spec"]["rules"] for m in rule["matches"]}
    assert SERVICE_NAME in services
    for rule in grpc_route["spec"]["rules"]:
        assert [(b["name"], b["port"]) for b in rule["backendRefs"]] == [
            (service["metadata"]["name"], service_port["grpc"])
        ]

    http_route = one(docs, "HTTPRoute")
    paths = {(m["path"]["value"], m.get("method")) for rule in http_route["spec"]["rules"] for m in rule["matches"]}
    assert ("/predict", "POST") in paths
    for rule in http_route["spec"]["rules"]:
        assert [(b["name"], b["port"]) for b in rule["backendRefs"]] == [
            (service["metadata"]["name"], service_port["http"])
        ]
        assert _seconds(rule["timeouts"]["request"]) >= settings.default_timeout_s

    for route in (grpc_route, http_route):
        (parent,) = route["spec"]["parentRefs"]
        assert parent["name"] == gateway["metadata"]["name"] and parent["sectionName"] in listeners
        assert set(route["spec"]["hostnames"]) == {listeners[parent["sectionName"]]["hostname"]}
    # The gateway's proxies may reach gRPC and HTTP; only the monitoring namespace reaches metrics.
    policy = one(docs, "NetworkPolicy")
    reachable = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert {settings.port, settings.http_port} <= reachable
    for rule in policy["spec"]["ingress"]:
        if settings.metrics_port in {p["port"] for p in rule["ports"]}:
            assert rule["from"] == [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ]


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


# -- the server image (checked statically: no container engine here) ------------------------------------
DOCKERFILE = ROOT / "encoder_server" / "Dockerfile"
IMAGE_PACKAGES = ("proto/flux2split_proto", "encoder_server/flux2_encoder_server")
NOT_IN_IMAGE = (
    "client/flux2_client/cli.py",
    "tests/conftest.py",
    ".venv/bin/python",
    ".venv-checkov/bin/checkov",
    ".git/HEAD",
    "out/image.png",
    "k8s/base/deployment.yaml",
    "encoder_server/flux2_encoder_server/__pycache__/server.cpython-311.pyc",
)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # line continuations
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def test_image_base_is_pinned_by_digest():
    bases = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert bases
    for base in bases:
        assert re.search(r"@sha256:[0-9a-f]{64}(\s|$)", base), f"FROM {base} is not pinned by digest"


def test_image_exposes_every_port_it_serves_on_and_k8s_uses_the_same():
    environ: dict[str, str] = {}
    exposed: set[int] = set()
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            environ.update(item.split("=", 1) for item in shlex.split(rest))
        elif word == "EXPOSE":
            exposed |= {int(p.split("/")[0]) for p in rest.split()}
    image = Settings.from_cli([], environ)  # `serve` with the image's environment and no flags
    served = {image.port, image.http_port, image.metrics_port}
    assert None not in served, "the image turns on gRPC, HTTP and metrics"
    assert exposed == served
    generator = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["configMapGenerator"]
    k8s = Settings.from_cli([], dict(item.split("=", 1) for item in generator[0]["literals"]))
    assert (k8s.port, k8s.http_port, k8s.metrics_port) == (image.port, image.http_port, image.metrics_port)


def test_image_holds_the_server_and_no_client_code():
    instructions = dockerfile_instructions()
    sources = [src for word, rest in instructions if word == "COPY" for src in shlex.split(rest)[:-1]]
    assert sources and not [s for s in sources if s.startswith("--")], "COPY only from the build context"
    for source in sources:
        assert source in ("pyproject.toml", "constraints.txt") or source.startswith(IMAGE_PACKAGES), source
        assert not dockerignore_excludes(source), f".dockerignore leaves out {source}, which the image needs"
    for path in NOT_IN_IMAGE:
        assert dockerignore_excludes(path), f".dockerignore lets {path} into the build context"
    # The project itself is never pip-installed: its one distribution would bring flux2_client along.
    for word, rest in instructions:
        if word == "RUN" and "pip install" in rest:
            assert not re.search(r"pip install[^&]*\s(-e\s+)?\.(\[|\s|$)", rest), rest
    (entrypoint,) = [json.loads(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    assert entrypoint == ["python", "-m", "flux2_encoder_server"]
    # ...which works because neither package of the image imports the client.
    for package in IMAGE_PACKAGES:
        for module in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(module.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                assert not [n for n in names if n.split(".")[0] == "flux2_client"], f"{module} imports the client"
