"""Deployment artefacts, checked without a cluster: Kubernetes schemas, KEDA fields, the
compose file's structure, and the dashboard against the metrics the pipeline exports.
"""

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.monitor.service import MonitorTelemetry
from pipeline.settings import Settings
from pipeline.telemetry import Telemetry

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.33.0"

# The ScaledObject and TriggerAuthentication fields this project uses, from KEDA's docs
# (keda.sh/docs/2.18/reference/scaledobject-spec and scalers/apache-kafka). KEDA's CRDs
# are not on PyPI, so this schema is ours: it catches typos and missing fields.
KEDA_SCHEMAS = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}},
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer"},
                    "pollingInterval": {"type": "integer"},
                    "advanced": {"type": "object"},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"const": "kafka"},
                                "authenticationRef": {
                                    "type": "object",
                                    "required": ["name"],
                                },
                                "metadata": {
                                    "type": "object",
                                    "required": [
                                        "bootstrapServers",
                                        "consumerGroup",
                                        "topic",
                                        "lagThreshold",
                                    ],
                                    "additionalProperties": False,
                                    "properties": {
                                        name: {"type": "string"}
                                        for name in (
                                            "bootstrapServers",
                                            "consumerGroup",
                                            "topic",
                                            "lagThreshold",
                                            "activationLagThreshold",
                                            "offsetResetPolicy",
                                            "allowIdleConsumers",
                                            "limitToPartitionsWithLag",
                                        )
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "properties": {
                                "parameter": {"enum": ["sasl", "username", "password", "tls", "ca"]}
                            },
                        },
                    }
                },
            },
        },
    },
}


def manifests():
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            yield path, document


def by_kind(kind):
    return [doc for _, doc in manifests() if doc["kind"] == kind]


@pytest.mark.parametrize(
    ("path", "document"), list(manifests()), ids=lambda v: getattr(v, "name", "")
)
def test_every_manifest_is_valid(path, document):
    schema = KEDA_SCHEMAS.get(document["kind"])
    if schema is not None:
        jsonschema.validate(document, schema)
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kustomizations_name_files_that_exist():
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            assert (kustomization.parent / resource).exists(), (kustomization, resource)


def config_text():
    (configmap,) = by_kind("ConfigMap")
    return configmap["data"]["streamscore.toml"]


def config_of_the_deployment():
    return Settings.model_validate(tomllib.loads(config_text()))  # the pipeline accepts it


def test_deployment_fits_the_pipeline():
    settings = config_of_the_deployment()
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "streamscore"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["terminationGracePeriodSeconds"] > 30 + 30  # flush timeout + commit
    assert container["lifecycle"]["preStop"]
    port = settings.telemetry.port
    assert container["ports"][0]["containerPort"] == port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {item["name"]: item for item in container["env"]}
    assert "secretKeyRef" in env["STREAMSCORE_KAFKA__SASL_PASSWORD"]["valueFrom"]
    assert "secretKeyRef" in env["STREAMSCORE_PRIVACY__PSEUDONYM_KEY"]["valueFrom"]
    assert "sasl_password" not in config_text()  # the secret comes from the Secret only
    # The root filesystem is read-only: snapshots need a volume of their own.
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert container["securityContext"]["readOnlyRootFilesystem"]
    state_volume = mounts[str(settings.features.snapshot_dir)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == state_volume]
    limit = volume["emptyDir"]["sizeLimit"]  # past it, the kubelet evicts the pod
    assert limit.endswith("Gi") and settings.features.snapshot_max_bytes < int(limit[:-2]) * 2**30


def test_one_monitor_reads_every_partition_and_serves_its_own_metrics():
    (monitor,) = [
        d for d in by_kind("Deployment") if d["metadata"]["name"] == "streamscore-monitor"
    ]
    assert monitor["spec"]["replicas"] == 1 and monitor["spec"]["strategy"]["type"] == "Recreate"
    (container,) = monitor["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["monitor"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert container["ports"][0]["containerPort"] == int(env["STREAMSCORE_TELEMETRY__PORT"])
    assert env["STREAMSCORE_TELEMETRY__PORT"] != str(config_of_the_deployment().telemetry.port)


def test_autoscalers_stop_at_the_partition_count_and_watch_the_right_group():
    settings = config_of_the_deployment()
    (scaled,) = by_kind("ScaledObject")
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert scaled["spec"]["maxReplicaCount"] == settings.topics.partitions
    assert hpa["spec"]["maxReplicas"] == settings.topics.partitions
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["consumerGroup"] == settings.consumer.group_id
    assert trigger["metadata"]["topic"] == settings.topics.input
    assert trigger["metadata"]["bootstrapServers"] == settings.kafka.bootstrap_servers


def test_compose_services_hang_together():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "pipeline", "monitor", "generator", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in compose["volumes"], (name, source)
            else:
                assert (DEPLOY / source).exists(), (name, source)
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]
    }
    assert jobs["streamscore"] == [f"pipeline:{Settings().telemetry.port}"]
    monitor_port = services["monitor"]["environment"]["STREAMSCORE_TELEMETRY__PORT"]
    assert jobs["streamscore-monitor"] == [f"monitor:{monitor_port}"]
    assert services["monitor"]["ports"] == [f"{monitor_port}:{monitor_port}"]


def test_dashboard_queries_only_metrics_streamscore_exports():
    families = {
        metric.name
        for registry in (Telemetry().registry, MonitorTelemetry(60).registry)
        for metric in registry.collect()
    }
    suffixes = ("", "_total", "_bucket", "_sum", "_count", "_info")
    exported = {family + suffix for family in families for suffix in suffixes}
    dashboard = json.loads((DEPLOY / "grafana/dashboards/streamscore.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])  # a row has none
        for name in re.findall(r"streamscore_[a-z_]+", target["expr"])
    }
    assert used, "the dashboard queries nothing"
    assert used <= exported, used - exported


def dockerfile_steps(path):
    """The instructions of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_gpu_image_gives_the_runtime_user_its_engine_cache_before_switching_to_it():
    steps = dockerfile_steps(DEPLOY / "Dockerfile.gpu")
    user = steps.index("USER 10001")
    owned = [i for i, step in enumerate(steps) if re.search(r"chown streamscore /engines\b", step)]
    assert owned and owned[0] < user
    assert any("useradd --uid 10001" in step for step in steps[:user])


def test_gpu_image_keeps_only_the_gpu_onnxruntime_and_checks_its_cuda_provider():
    (install,) = [s for s in dockerfile_steps(DEPLOY / "Dockerfile.gpu") if '".[gpu]"' in s]
    order = [
        'pip install ".[gpu]"',
        "pip uninstall -y onnxruntime onnxruntime-gpu",
        'pip install --no-deps "onnxruntime-gpu==$ort_gpu"',
        "'CUDAExecutionProvider' in p",
    ]
    positions = [install.find(part) for part in order]
    assert -1 not in positions and positions == sorted(positions), positions


def test_gpu_extra_needs_a_pycuda_that_builds_against_cuda_13():
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    gpu = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["gpu"]]
    (pycuda,) = [r for r in gpu if r.name == "pycuda"]
    assert not pycuda.specifier.contains("2025.1.1") and pycuda.specifier.contains("2025.1.2")
