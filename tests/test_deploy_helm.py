"""The Helm chart (helm/pagedserve): strict lint, render with several values sets, Kubernetes schema
validation of the rendered manifests, and the fields that matter for a GPU worker fleet.

Offline: helm-python-sdk renders with Helm's Go engine (no helm binary, no cluster), and
kubernetes-validate ships the Kubernetes OpenAPI schemas.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is needed to lint/render the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parents[1] / "helm" / "pagedserve"
KUBE_VERSION = "1.30.0"
# Custom resources: no schema in kubernetes-validate; their fields are asserted below instead.
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}


def _ci_values(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text()) or {}


VALUE_SETS = {
    "defaults": {},
    "gpu": _ci_values("default"),
    "keda": _ci_values("keda"),
    "cpu": _ci_values("cpu"),
}


def render(values: dict | None = None, *, name: str = "rel", namespace: str = "ml") -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values or {})
        out = chart.render(copy.deepcopy(values) if values else None, name=name, namespace=namespace,
                           is_install=True)
    docs: list[dict] = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def notes(values: dict | None = None) -> str:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="rel", namespace="ml", is_install=True)
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def worker_container(docs: list[dict]) -> dict:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "worker")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(values) for name, values in VALUE_SETS.items()}


@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_chart_lints_strictly(values_name):
    report = helm.lint(str(CHART), VALUE_SETS[values_name] or None, strict=True, namespace="ml",
                       kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_rendered_manifests_pass_kubernetes_schema(rendered, values_name):
    docs = rendered[values_name]
    assert docs
    for doc in docs:
        assert doc["metadata"]["name"]
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_gpu_worker_pod(rendered):
    docs = rendered["gpu"]
    deploy = one(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    c = worker_container(docs)
    assert c["args"] == ["worker"]
    assert c["image"].endswith(":0.1.0-cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # /dev/shm is a memory-backed emptyDir
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    # non-root, read-only root filesystem
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_probes(rendered):
    c = worker_container(rendered["gpu"])
    startup, liveness, readiness = c["startupProbe"], c["livenessProbe"], c["readinessProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert liveness["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert readiness["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # the startup probe leaves minutes for a model load before liveness takes over
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"]


def test_settings_from_configmap_and_redis_url_from_secret(rendered):
    docs = rendered["gpu"]
    c = worker_container(docs)
    cm = one(docs, "ConfigMap")
    assert {"configMapRef": {"name": cm["metadata"]["name"]}} in c["envFrom"]
    data = cm["data"]
    assert data["PAGEDSERVE_PREFIX"] == "pagedserve"
    assert data["PAGEDSERVE_DEVICE"] == "cuda"
    assert data["PAGEDSERVE_METRICS_PORT"] == "9400"
    assert data["PAGEDSERVE_SHUTDOWN_GRACE_S"] == data["PAGEDSERVE_GRACE_PERIOD_S"] == "30"
    assert "PAGEDSERVE_MODEL" not in data  # built-in model by default
    assert "PAGEDSERVE_REDIS_URL" not in data  # the URL (with password) never sits in the ConfigMap
    assert all(isinstance(v, str) for v in data.values())

    env = {e["name"]: e for e in c["env"]}
    ref = env["PAGEDSERVE_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    secret = one(docs, "Secret")
    assert ref == {"name": secret["metadata"]["name"], "key": "redis-url"}
    assert secret["stringData"]["redis-url"] == "redis://:s3cret@redis-master.redis.svc:6379/0"
    assert secret["stringData"]["redis-password"] == "s3cret"


def test_existing_secret_is_referenced_not_created(rendered):
    docs = rendered["keda"]
    assert not by_kind(docs, "Secret")
    ref = {e["name"]: e for e in worker_container(docs)["env"]}["PAGEDSERVE_REDIS_URL"]
    assert ref["valueFrom"]["secretKeyRef"] == {"name": "pagedserve-redis", "key": "redis-url"}


def test_torch_threads_follow_the_cpu_request(rendered):
    env = {e["name"]: e for e in worker_container(rendered["cpu"])["env"]}
    ref = env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": "worker", "resource": "requests.cpu", "divisor": "1"}
    env = {e["name"]: e for e in worker_container(render({"cpuThreads": 3}))["env"]}
    assert env["OMP_NUM_THREADS"]["value"] == "3"
    env = {e["name"] for e in worker_container(render({"cpuThreads": ""}))["env"]}
    assert "OMP_NUM_THREADS" not in env


def test_termination_grace_matches_worker_drain(rendered):
    docs = rendered["gpu"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    grace = int(one(docs, "ConfigMap")["data"]["PAGEDSERVE_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > grace
    docs = render({"worker": {"shutdownGraceSeconds": 120, "terminationGraceMarginSeconds": 20}})
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert one(docs, "ConfigMap")["data"]["PAGEDSERVE_SHUTDOWN_GRACE_S"] == "120"
    assert one(docs, "ConfigMap")["data"]["PAGEDSERVE_GRACE_PERIOD_S"] == "120"
    assert pod["terminationGracePeriodSeconds"] == 140


def test_pdb(rendered):
    pdb = one(rendered["gpu"], "PodDisruptionBudget")
    deploy = one(rendered["gpu"], "Deployment")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    assert one(rendered["keda"], "PodDisruptionBudget")["spec"]["maxUnavailable"] == "25%"


def test_model_volume(rendered):
    docs = rendered["keda"]
    c = worker_container(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["model"]["persistentVolumeClaim"] == {"claimName": "llm-weights", "readOnly": True}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
    assert mount["readOnly"] is True and mount["subPath"] == "llama-3.1-8b-instruct"
    assert one(docs, "ConfigMap")["data"]["PAGEDSERVE_MODEL"] == "/models/llama-3.1-8b-instruct"
    # arbitrary volume source, e.g. a Kubernetes image volume holding the weights
    docs = render({"model": {"path": "/models/m", "volume": {"hostPath": {"path": "/srv/m", "type": "Directory"}}}})
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["model"]["hostPath"]["path"] == "/srv/m"


def test_keda_scaled_object(rendered):
    docs = rendered["keda"]
    deploy = one(docs, "Deployment")
    assert "replicas" not in deploy["spec"]  # owned by the autoscaler
    so = one(docs, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": deploy["metadata"]["name"]}
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] == 16
    assert spec["fallback"] == {"failureThreshold": 3, "replicas": 2}
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    trigger, batches = spec["triggers"]
    assert trigger["type"] == "redis-streams"
    md = trigger["metadata"]
    assert md["stream"] == "pagedserve:requests"
    # XLEN (streamLength) is read only without consumerGroup; activationLagCount, KEDA's only activation key,
    # applies to every metric (KEDA 2.16+): 0 = active on any entry
    assert md["streamLength"] == "32" and "consumerGroup" not in md
    assert [k for k in md if k.startswith("activation")] == ["activationLagCount"]
    assert md["activationLagCount"] == "0"
    assert md["address"] == "redis-master.redis.svc:6379"
    assert all(isinstance(v, str) for v in md.values())  # KEDA metadata is map[string]string
    # at zero replicas the batches waiting start a worker (their lines reach the stream only through one)
    assert batches["type"] == "redis"
    assert batches["metadata"] == {"address": md["address"], "databaseIndex": "0", "enableTLS": "false",
                                   "listName": "pagedserve:batches:active", "listLength": "8"}
    ta = one(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"] == batches["authenticationRef"] == {"name": ta["metadata"]["name"]}
    assert ta["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "pagedserve-redis", "key": "redis-password"}]
    assert not by_kind(docs, "HorizontalPodAutoscaler")  # KEDA owns the HPA


def test_keda_pending_trigger_and_url_parsing():
    docs = render({"keda": {"enabled": True, "trigger": {"metric": "pending", "threshold": 8}},
                   "prefix": "chat",
                   "redis": {"url": "rediss://app:pw@redis.internal:6380/3"}})
    md = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert md["pendingEntriesCount"] == "8" and "lagCount" not in md
    assert [k for k in md if k.startswith("activation")] == ["activationLagCount"]
    assert md["stream"] == "chat:requests" and md["consumerGroup"] == "chat-workers"
    assert md["address"] == "redis.internal:6380"
    assert md["enableTLS"] == "true" and md["databaseIndex"] == "3"
    secret = one(docs, "Secret")["stringData"]
    assert secret["redis-password"] == "pw" and secret["redis-username"] == "app"
    assert one(docs, "ConfigMap")["data"]["PAGEDSERVE_PREFIX"] == "chat"


def test_service_monitor(rendered):
    sm = one(rendered["keda"], "ServiceMonitor")
    svc = one(rendered["keda"], "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert not by_kind(rendered["gpu"], "ServiceMonitor")


def test_a_scrape_timeout_longer_than_the_interval_is_refused_and_an_empty_one_left_to_prometheus():
    """interval 5s beside the scrapeTimeout default of 10s rendered a scrape Prometheus refuses ("scrape timeout
    greater than scrape interval"): the workers were never scraped, the alerts and the batch trigger read nothing.
    The timeout is left out unless set (Prometheus cuts its own to the interval), and a longer one is refused."""
    def endpoint(**sm) -> dict:
        return one(render({"serviceMonitor": {"enabled": True, **sm}}), "ServiceMonitor")["spec"]["endpoints"][0]

    assert "scrapeTimeout" not in endpoint(interval="5s")
    assert endpoint(interval="1m", scrapeTimeout="59s")["scrapeTimeout"] == "59s"
    assert endpoint(interval="1m30s", scrapeTimeout="1m30s")["scrapeTimeout"] == "1m30s"
    for interval, timeout in (("5s", "10s"), ("9s", "10s"), ("1m", "1m1s"), ("500ms", "1s")):
        render_fails({"serviceMonitor": {"enabled": True, "interval": interval, "scrapeTimeout": timeout}},
                     f"serviceMonitor.scrapeTimeout: {timeout} is longer than serviceMonitor.interval ({interval})")
    with helm.Chart.load(str(CHART)) as chart:
        for bad in ({"interval": "5"}, {"interval": ""}, {"scrapeTimeout": "ten"}, {"interval": "1.5s"}):
            with pytest.raises(helm.HelmError):
                chart.validate_schema({"serviceMonitor": bad})


def test_a_pod_label_the_chart_sets_is_refused():
    """podLabels were written after the chart's own labels: one of the same name rendered a duplicate YAML key,
    and a pod template whose labels do not match the Deployment's selector, which the API server refuses."""
    for name in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"):
        render_fails({"podLabels": {name: "other"}}, f"podLabels.{name}: the chart sets this label")
    labels = one(render({"podLabels": {"team": "ml"}}), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "ml" and labels["app.kubernetes.io/component"] == "worker"


def test_cpu_only(rendered):
    docs = rendered["cpu"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = worker_container(docs)
    assert c["image"].endswith(":0.1.0-cpu")
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert "runtimeClassName" not in pod
    assert "nvidia.com/gpu.present" not in pod.get("nodeSelector", {})
    assert not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    assert one(docs, "ConfigMap")["data"]["PAGEDSERVE_DEVICE"] == "cpu"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 6
    assert "replicas" not in one(docs, "Deployment")["spec"]
    assert one(docs, "Secret")["stringData"]["redis-url"].startswith("rediss://")


def test_config_checksum_rolls_pods():
    a = one(render({}), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    b = one(render({"engine": {"maxNumSeqs": 64}}), "Deployment")
    assert b["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != a


def test_schema_rejects_bad_values():
    with helm.Chart.load(str(CHART)) as chart:
        for bad in ({"gpu": {"enabled": "yes"}}, {"engine": {"preemptionMode": "never"}},
                    {"keda": {"trigger": {"metric": "cpu", "threshold": 1}}}, {"replicaCount": -1},
                    {"redis": {"url": "http://x"}}, {"unknownKey": 1}, {"prefix": "{chat}"},
                    {"cpuThreads": 0}, {"cpuThreads": "many"},
                    {"worker": {"claimIdleMs": 99}}):  # the worker refuses claim_idle_ms < 100 at start
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)


def test_notes_render(rendered):
    text = notes(VALUE_SETS["keda"])
    assert "pagedserve:requests" in text and "KEDA" in text


def test_tensor_parallel_size_sets_the_engine_and_the_gpu_limit():
    docs = render({"engine": {"tensorParallelSize": 4}})
    assert worker_container(docs)["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert one(docs, "ConfigMap")["data"]["PAGEDSERVE_TENSOR_PARALLEL_SIZE"] == "4"
    assert worker_container(render({"engine": {"tensorParallelSize": 4}, "gpu": {"count": 4}}))[
        "resources"]["limits"]["nvidia.com/gpu"] == 4
    # and the install notes say what the pods ask for
    assert "Each worker requests 4 x nvidia.com/gpu" in notes({"engine": {"tensorParallelSize": 4}})


@pytest.mark.parametrize(("count", "ranks", "idle"), [(2, None, 1), (4, 2, 2)])
def test_a_gpu_count_above_the_ranks_is_refused(count, ranks, idle):
    """The pod asked for gpu.count GPUs while the engine ran engine.tensorParallelSize ranks, one GPU each: the
    GPUs past the ranks were reserved and never used, without a word."""
    values = {"gpu": {"count": count}, **({"engine": {"tensorParallelSize": ranks}} if ranks else {})}
    render_fails(values, f"gpu.count: {count} GPUs", f"{idle} would sit idle",
                 f"engine.tensorParallelSize: {count}")
    render({**values, "gpu": {"count": count, "enabled": False}, "engine": {"device": "cpu"}})  # no GPUs asked


def test_decimals_given_with_set_are_taken():
    """``helm install --set engine.gpuMemoryUtilization=0.85`` gives the chart a string (--set types only
    integers and booleans): the schema wanted a number and refused the usual vLLM-style override."""
    docs = render({"engine": {"gpuMemoryUtilization": "0.85", "swapSpaceGb": "0.5"}, "worker": {"stallTimeoutS": "2.5"}})
    data = one(docs, "ConfigMap")["data"]
    assert (data["PAGEDSERVE_GPU_MEMORY_UTILIZATION"], data["PAGEDSERVE_SWAP_SPACE_GB"],
            data["PAGEDSERVE_STALL_TIMEOUT_S"]) == ("0.85", "0.5", "2.5")
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({"engine": {"gpuMemoryUtilization": "1.0", "swapSpaceGb": "4"}})
        for bad in ({"engine": {"gpuMemoryUtilization": "1.5"}}, {"engine": {"gpuMemoryUtilization": "0"}},
                    {"engine": {"gpuMemoryUtilization": "most"}}, {"engine": {"swapSpaceGb": "-1"}},
                    {"worker": {"stallTimeoutS": "0"}}, {"worker": {"stallTimeoutS": "1e3"}}):
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)


# ---------------------------------------------------------------- KEDA: what the redis-streams scaler really reads


def keda_reads(md: dict) -> str:
    """The metric KEDA's redis-streams scaler picks from the trigger metadata (redisStreamsMetadata): with
    consumerGroup, lagCount when given, else pendingEntriesCount (default 5); streamLength only without it."""
    if md.get("consumerGroup"):
        return "lag" if md.get("lagCount", "0") not in ("", "0") else "pending"
    return "length"


def keda_trigger(values: dict) -> dict:
    values = {"keda": {"enabled": True}, **values}
    return one(render(values), "ScaledObject")["spec"]["triggers"][0]["metadata"]


def render_fails(values: dict, *needles: str) -> str:
    with pytest.raises(helm.HelmError) as e:
        render(values)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.mark.parametrize("metric", ["length", "lag", "pending"])
def test_keda_reads_the_metric_asked_for(metric):
    md = keda_trigger({"keda": {"enabled": True, "trigger": {"metric": metric, "threshold": 24}}})
    assert keda_reads(md) == metric
    key = {"length": "streamLength", "lag": "lagCount", "pending": "pendingEntriesCount"}[metric]
    assert md[key] == "24"
    if metric != "length":
        assert md["consumerGroup"] == "pagedserve-workers"
    # the only activation key KEDA reads is activationLagCount, for every metric (KEDA 2.16+)
    assert [k for k in md if k.startswith("activation")] == ["activationLagCount"]


def test_keda_defaults_to_stream_length():
    md = keda_trigger({})
    assert keda_reads(md) == "length" and md["streamLength"] == "16"


def test_keda_scale_to_zero_only_on_stream_length():
    # lag misses in-flight and handed-back entries, pending misses queued ones: at zero replicas either can
    # read 0 while requests wait
    for metric in ("lag", "pending"):
        render_fails({"keda": {"enabled": True, "minReplicaCount": 0, "trigger": {"metric": metric, "threshold": 4}}},
                     "keda.minReplicaCount=0", "length")
    md = keda_trigger({"keda": {"enabled": True, "minReplicaCount": 0, "trigger": {"metric": "length", "threshold": 4}}})
    assert keda_reads(md) == "length"


# What KEDA's redis scaler runs on its listName, as a script (EVAL): TYPE, then ZCARD of a sorted set, LLEN of a
# list or of a missing key. Each command is checked against the ACL of the user KEDA logs in with.
KEDA_REDIS_LENGTH = """local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'zset' then return redis.call('ZCARD', KEYS[1]) end
return redis.call('LLEN', KEYS[1])"""


def keda_active_at_zero(r, trigger: dict) -> bool:
    """Whether KEDA would start a worker on this trigger while none runs (each activates above 0 here)."""
    md = trigger["metadata"]
    if trigger["type"] == "redis-streams":
        assert keda_reads(md) == "length", md
        return r.xlen(md["stream"]) > int(md.get("activationLagCount", 0))
    if trigger["type"] == "redis":
        return r.eval(KEDA_REDIS_LENGTH, 1, md["listName"]) > int(md.get("activationListLength", 0))
    assert trigger["type"] == "prometheus", trigger
    return False  # the workers' own metrics: no worker, no series


def documented_keda_acl(prefix: str) -> list[str]:
    """The rules values.yaml gives a Redis user of KEDA's own, for ``prefix``."""
    text = " ".join(w for w in (CHART / "values.yaml").read_text().split() if w != "#")
    rules = re.search(r"ACL SETUSER pagedserve-keda on >PASSWORD (.*?\+llen)", text).group(1).split()
    return [rule.replace("pagedserve:", f"{prefix}:") for rule in rules]


def test_keda_at_zero_starts_a_worker_for_a_batch(redis_url, prefix):
    """A batch submitted while KEDA holds the fleet at zero: its lines reach the request stream only through a
    running worker's batch feeder, so the stream stays empty; KEDA must see the batch itself, or it waits until
    its window expires. Checked on a real Redis, logged in as the KEDA user values.yaml documents."""
    redis = pytest.importorskip("redis")
    from pagedserve.service.batch_client import create_batch

    triggers = one(render({**VALUE_SETS["keda"], "prefix": prefix}), "ScaledObject")["spec"]["triggers"]
    admin = redis.Redis.from_url(redis_url)
    user = f"{prefix}-keda"
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", ">keda-pw", *documented_keda_acl(prefix))
    keda = redis.Redis.from_url(redis_url.replace("redis://", f"redis://{user}:keda-pw@", 1))
    try:
        # nothing waits: every trigger reads 0, so the fleet may go to zero (no batch key yet: LLEN of nothing)
        assert not [t["type"] for t in triggers if keda_active_at_zero(keda, t)]
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}}
        bid, created = create_batch(admin, prefix, json.dumps(line).encode() + b"\n")
        assert created and admin.hget(f"{prefix}:batch:{bid}", "status") == b"in_progress"
        assert admin.xlen(f"{prefix}:requests") == 0  # no worker, no line fed
        assert [t["type"] for t in triggers if keda_active_at_zero(keda, t)] == ["redis"]
        # With the chart's own Secret KEDA logs in as the worker: its ACL reads every trigger too.
        from pagedserve.service.connection import worker_acl

        admin.execute_command("ACL", "SETUSER", f"{user}-w", "reset", "on", ">keda-pw", *worker_acl(prefix))
        with redis.Redis.from_url(redis_url.replace("redis://", f"redis://{user}-w:keda-pw@", 1)) as as_worker:
            assert [t["type"] for t in triggers if keda_active_at_zero(as_worker, t)] == ["redis"]
    finally:
        keda.close()
        admin.execute_command("ACL", "DELUSER", user, f"{user}-w")
        admin.close()


def test_keda_active_batches_trigger_only_at_zero():
    """With a worker always running it feeds the batches itself: the trigger (and the EVAL it needs) is left out;
    turned off at zero the notes say that batches then wait."""
    def types(values):
        return [t["type"] for t in one(render(values), "ScaledObject")["spec"]["triggers"]]

    assert types({"keda": {"enabled": True, "minReplicaCount": 1}}) == ["redis-streams"]
    at_zero = {"keda": {"enabled": True, "minReplicaCount": 0}}
    assert types(at_zero) == ["redis-streams", "redis"]
    assert "+eval +type +zcard +llen" in notes(at_zero)
    off = {"keda": {"enabled": True, "minReplicaCount": 0, "activeBatchesTrigger": {"enabled": False}}}
    assert types(off) == ["redis-streams"]
    text = notes(off)
    assert "WARNING" in text and "keda.activeBatchesTrigger" in text and "batch" in text, text
    assert "keda.activeBatchesTrigger" not in notes({"keda": {"enabled": True, "minReplicaCount": 1}})


def test_keda_batch_backlog_trigger_at_zero_needs_the_active_batches_trigger():
    """The backlog metric comes from running workers: at zero only the active-batches trigger starts one."""
    values = {"keda": {"enabled": True, "minReplicaCount": 0, "batchTrigger": {"enabled": True}},
              "serviceMonitor": {"enabled": True}}
    assert [t["type"] for t in one(render(values), "ScaledObject")["spec"]["triggers"]] == [
        "redis-streams", "redis", "prometheus"]
    values["keda"]["activeBatchesTrigger"] = {"enabled": False}
    render_fails(values, "keda.batchTrigger", "keda.activeBatchesTrigger")


@pytest.mark.parametrize("metric", ["length", "lag", "pending"])
def test_keda_activation_applies_to_every_metric(metric):
    """KEDA's redis-streams scaler (pkg/scalers/redis_streams_scaler.go, from 2.16 on) parses activationLagCount
    whatever the metric and reports the trigger active while ``metricCount > ActivationLagCount``: XLEN, XPENDING
    and lag alike."""
    md = keda_trigger({"keda": {"enabled": True, "trigger": {"metric": metric, "threshold": 8,
                                                              "activationThreshold": 3}}})
    assert keda_reads(md) == metric and md["activationLagCount"] == "3"


def test_keda_activation_at_zero_on_stream_length():
    # scale to zero on XLEN with an activation value: the fleet starts once more than 3 entries wait
    md = keda_trigger({"keda": {"enabled": True, "minReplicaCount": 0,
                                "trigger": {"metric": "length", "threshold": 16, "activationThreshold": 3}}})
    assert keda_reads(md) == "length" and md["activationLagCount"] == "3"


def test_keda_consumer_group_override_is_refused():
    # the worker's group is always <prefix>-workers: KEDA watching another group sees no work
    render_fails({"keda": {"enabled": True, "consumerGroup": "other"}}, "keda.consumerGroup")


@pytest.mark.parametrize("values, address", [
    ({"redis": {"host": "redis-master"}}, "redis-master.ml:6379"),
    ({"redis": {"host": "redis-master.redis", "port": 6380}}, "redis-master.redis:6380"),
    ({"redis": {"url": "redis://:pw@redis:6380/0"}}, "redis.ml:6380"),
    ({"redis": {"url": "redis://redis/0"}}, "redis.ml:6379"),
    ({"redis": {"url": "redis://10.0.0.7:6390/0"}}, "10.0.0.7:6390"),
    ({"redis": {"url": "redis://[fd00::7]:6390/0"}}, "[fd00::7]:6390"),
    ({"redis": {"host": "redis-master"}, "keda": {"enabled": True, "address": "redis:7000"}}, "redis:7000"),
])
def test_keda_address_resolves_from_kedas_namespace(values, address):
    # KEDA resolves a bare Service name in its own namespace, not the release's
    assert keda_trigger(values)["address"] == address


def test_keda_unsafe_ssl_follows_the_url():
    md = keda_trigger({"redis": {"url": "rediss://u:p@r.example:6380/0?ssl_cert_reqs=none"}})
    assert md["enableTLS"] == "true" and md["unsafeSsl"] == "true"
    assert "unsafeSsl" not in keda_trigger({"redis": {"url": "rediss://u:p@r.example:6380/0"}})


@pytest.mark.parametrize("userinfo", ["pagedserve-worker:p%40ss%23w", "default:a%20b", "u%20x:%C3%BC~",
                                      "u:x+y%2Bz", "u:pa%3Ass%2Fw%3Frd%25", "u:%F0%9F%94%91k%E2%82%AC"])
def test_keda_credentials_from_url_are_decoded(userinfo):
    """KEDA sends the Secret's redis-password as is: it must be what redis-py decodes from the URL."""
    docs = render({"redis": {"url": f"redis://{userinfo}@redis.redis:6379/0"}, "keda": {"enabled": True}})
    secret = one(docs, "Secret")["stringData"]
    user, _, password = userinfo.partition(":")
    assert secret["redis-password"] == unquote(password)
    assert secret["redis-username"] == unquote(user)
    ta = one(docs, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {"parameter": "username", "name": "rel-pagedserve-redis", "key": "redis-username"} in ta


def test_keda_acl_user_with_existing_secret():
    values = {"redis": {"existingSecret": "mine", "usernameKey": "user", "host": "redis.redis"},
              "keda": {"enabled": True}}
    ta = one(render(values), "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert sorted(ta, key=lambda r: r["parameter"]) == [
        {"parameter": "password", "name": "mine", "key": "redis-password"},
        {"parameter": "username", "name": "mine", "key": "user"}]
    # a username the chart cannot hand to KEDA (TriggerAuthentication reads Secrets only) is refused
    render_fails({"redis": {"existingSecret": "mine", "username": "pagedserve-worker", "host": "redis.redis"},
                  "keda": {"enabled": True}},
                 "redis.usernameKey")


@pytest.mark.parametrize("username, password", [("pagedserve-worker", "a b"), ("u x", "x+y"), ("u", "p@ss #1+"),
                                                ("ü", "pa:ss/w?rd%~")])
def test_url_from_parts_round_trips(username, password):
    connection = pytest.importorskip("redis.connection")
    url = one(render({"redis": {"host": "redis", "username": username, "password": password}}),
              "Secret")["stringData"]["redis-url"]
    got = connection.parse_url(url)  # what the worker (redis-py) decodes
    assert (got["username"], got["password"]) == (username, password), url


def test_replica_bounds_are_checked():
    render_fails({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "autoscaling.minReplicas")
    render_fails({"keda": {"enabled": True, "minReplicaCount": 5, "maxReplicaCount": 2}}, "keda.minReplicaCount")


def test_claim_idle_ms_minimum_matches_the_worker():
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({"worker": {"claimIdleMs": 100}})
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"worker": {"claimIdleMs": 99}})


@pytest.mark.parametrize("key, setting", [("claimIdleMs", "claim_idle_ms"), ("resultTtlS", "result_ttl_s"),
                                          ("maxQueueMs", "max_queue_ms")])
def test_the_schemas_time_bounds_are_the_workers(key, setting):
    """resultTtlS 3000000000 passed the schema and rendered; the worker refused it at start, every pod in a crash
    loop. The schema's bounds are the settings' own."""
    from pydantic import ValidationError

    from pagedserve.service.settings import Settings

    bound = Settings.model_fields[setting].metadata
    top = next(m.le for m in bound if getattr(m, "le", None) is not None)
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({"worker": {key: top}})
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"worker": {key: top + 1}})
    with pytest.raises(ValidationError):
        Settings(**{setting: top + 1})


# ---------------------------------------------------------------- the worker pod


def test_cpu_threads_auto_without_a_cpu_request_stays_unset():
    # the downward API reads a missing CPU request as "0", which the worker refuses at start
    for resources in ({"requests": {"memory": "24Gi", "cpu": None}, "limits": {"memory": "48Gi"}},
                      {"requests": {"cpu": "0"}}):
        env = {e["name"] for e in worker_container(render({"resources": resources}))["env"]}
        assert not {"OMP_NUM_THREADS", "PAGEDSERVE_CPU_THREADS"} & env
    # a CPU limit alone is copied into the request by the API server: the downward API reads it
    env = {e["name"]: e for e in worker_container(render(
        {"resources": {"requests": {"cpu": None}, "limits": {"cpu": "3"}}}))["env"]}
    assert env["PAGEDSERVE_CPU_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"


def _image_env() -> dict[str, str]:
    text = re.sub(r"\\\n", " ", (CHART.parents[1] / "Dockerfile").read_text())
    env = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_cache_locations_follow_the_cache_mount():
    docs = render({"cache": {"mountPath": "/var/cache/ps"}})
    c = worker_container(docs)
    assert {"name": "cache", "mountPath": "/var/cache/ps"} in c["volumeMounts"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    for name in ("XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "CUDA_CACHE_PATH"):
        assert (env.get(name) or "").startswith("/var/cache/ps"), (name, env.get(name))
    # every cache location the image points into its default cache directory is moved along
    image_env = _image_env()
    assert image_env["XDG_CACHE_HOME"] == "/home/pagedserve/.cache"
    for name, value in image_env.items():
        if value.startswith("/home/pagedserve/.cache"):
            assert (env.get(name) or "").startswith("/var/cache/ps"), name


def test_notes_submit_does_not_use_the_worker_user():
    # the worker ACL has no XREAD / XINFO CONSUMERS: `pagedserve submit` inside a worker pod fails
    text = notes(VALUE_SETS["keda"])
    assert not re.search(r"exec\s+deploy/\S+\s+--\s+pagedserve submit", text)
    assert re.search(r"kubectl -n ml run \S+ .*--rm", text)
    assert "PAGEDSERVE_REDIS_URL=redis://PRODUCER_USER:PASSWORD@redis-master.redis.svc:6379/0" in text
    assert "-- submit" in text


# ---------------------------------------------------------------- values as a values file hands them over


def test_large_integers_reach_the_worker_as_integers(monkeypatch):
    """Every number of a values file reaches the templates as a float64, which "%v" writes as 2.592e+06 from
    10**6 on: the worker's settings refuse that, and the pods crash-loop."""
    from pagedserve.service.settings import Settings

    values = {"worker": {"resultTtlS": 2592000, "maxQueueMs": 1800000, "claimIdleMs": 1800000},
              "engine": {"maxModelLen": 1048576},
              "extraConfig": {"PAGEDSERVE_MAX_MESSAGE_BYTES": 4194304, "PAGEDSERVE_DEAD_LETTER_MAXLEN": 1000000},
              "keda": {"enabled": True, "minReplicaCount": 1, "trigger": {"metric": "length", "threshold": 1000000},
                       "batchTrigger": {"enabled": True, "threshold": 2000000}}}
    docs = render(values)
    data = one(docs, "ConfigMap")["data"]
    assert {k: data[k] for k in ("PAGEDSERVE_RESULT_TTL_S", "PAGEDSERVE_MAX_QUEUE_MS", "PAGEDSERVE_CLAIM_IDLE_MS",
                                 "PAGEDSERVE_MAX_MODEL_LEN", "PAGEDSERVE_MAX_MESSAGE_BYTES",
                                 "PAGEDSERVE_DEAD_LETTER_MAXLEN")} == {
        "PAGEDSERVE_RESULT_TTL_S": "2592000", "PAGEDSERVE_MAX_QUEUE_MS": "1800000",
        "PAGEDSERVE_CLAIM_IDLE_MS": "1800000", "PAGEDSERVE_MAX_MODEL_LEN": "1048576",
        "PAGEDSERVE_MAX_MESSAGE_BYTES": "4194304", "PAGEDSERVE_DEAD_LETTER_MAXLEN": "1000000"}
    assert data["PAGEDSERVE_GPU_MEMORY_UTILIZATION"] == "0.9"  # fractions stay as they are
    # the worker reads the ConfigMap as it is
    for name in [n for n in os.environ if n.upper().startswith("PAGEDSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in data.items():
        if name.startswith("PAGEDSERVE_"):
            monkeypatch.setenv(name, value)
    s = Settings()
    assert (s.result_ttl_s, s.max_queue_ms, s.max_model_len, s.max_message_bytes) == (2592000, 1800000, 1048576,
                                                                                    4194304)
    triggers = one(docs, "ScaledObject")["spec"]["triggers"]
    assert triggers[0]["metadata"]["streamLength"] == "1000000"
    assert triggers[1]["metadata"]["threshold"] == "2000000"


def test_keda_batch_trigger_reads_only_its_own_release():
    """Two releases in one namespace (two models, two prefixes) each scale on their own batch backlog."""
    values = {"keda": {"enabled": True, "minReplicaCount": 1, "batchTrigger": {"enabled": True}},
              "serviceMonitor": {"enabled": True}}
    queries = {}
    for release, prefix in (("chat", "chat"), ("code", "code")):
        docs = render({**values, "prefix": prefix}, name=release)
        svc = one(docs, "Service")["metadata"]["name"]
        # the Prometheus Operator labels every target of a ServiceMonitor with service=<the Service's name>
        assert one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"] == one(docs, "Service")["spec"][
            "selector"]
        (query,) = [t["metadata"]["query"] for t in one(docs, "ScaledObject")["spec"]["triggers"]
                    if t["type"] == "prometheus"]
        assert f'service="{svc}"' in query and 'namespace="ml"' in query, query
        queries[release] = query
    assert queries["chat"] != queries["code"]


@pytest.mark.parametrize("values, variable, instead", [
    ({"extraConfig": {"PAGEDSERVE_PREFIX": "chat"}}, "PAGEDSERVE_PREFIX", "prefix"),
    ({"extraConfig": {"PAGEDSERVE_METRICS_PORT": 9500}}, "PAGEDSERVE_METRICS_PORT", "worker.metricsPort"),
    ({"extraConfig": {"pagedserve_prefix": "chat"}}, "pagedserve_prefix", "prefix"),  # settings ignore case
    ({"extraConfig": {"PAGEDSERVE_SHUTDOWN_GRACE_S": 300}}, "PAGEDSERVE_SHUTDOWN_GRACE_S",
     "worker.shutdownGraceSeconds"),
    ({"extraConfig": {"PAGEDSERVE_REDIS_URL": "redis://r:6379/0"}}, "PAGEDSERVE_REDIS_URL", "redis.url"),
    ({"extraEnv": [{"name": "PAGEDSERVE_PREFIX", "value": "chat"}]}, "PAGEDSERVE_PREFIX", "prefix"),
    ({"extraEnv": [{"name": "PAGEDSERVE_METRICS_PORT", "value": "9500"}]}, "PAGEDSERVE_METRICS_PORT",
     "worker.metricsPort"),
    ({"extraEnv": [{"name": "PAGEDSERVE_CPU_THREADS", "value": "8"}]}, "PAGEDSERVE_CPU_THREADS", "cpuThreads"),
])
def test_extra_config_cannot_override_chart_settings(values, variable, instead):
    # KEDA, the probes and the drain follow the chart's values: a variable overriding one of them in the pod
    # would leave them disagreeing with the worker
    render_fails(values, variable, instead)


def test_every_variable_the_chart_sets_is_refused_in_extra_config():
    data = one(render({"model": {"path": "/models/m"}, "engine": {"maxModelLen": 4096}}), "ConfigMap")["data"]
    for name in [n for n in data if n.startswith("PAGEDSERVE_")]:
        render_fails({"extraConfig": {name: "1"}}, f"extraConfig.{name}", "instead")


def test_extra_config_passes_other_variables():
    docs = render({"extraConfig": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "PAGEDSERVE_READ_BLOCK_MS": 20},
                   "extraEnv": [{"name": "PAGEDSERVE_SEED", "value": "7"}]})
    data = one(docs, "ConfigMap")["data"]
    assert data["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio" and data["PAGEDSERVE_READ_BLOCK_MS"] == "20"
    assert {"name": "PAGEDSERVE_SEED", "value": "7"} in worker_container(docs)["env"]


PASSWORD = "Zq9SecretPw"


@pytest.mark.parametrize("url", [
    f"redis://app:{PASSWORD}%zz@redis:6379/0",  # % not followed by two hex digits
    f"redis://app:{PASSWORD} x@redis:6379/0",  # a space
    f"redis://app:{PASSWORD}%@redis:6379/0",
    f"redis://app:{PASSWORD}/x@redis:6379/0",  # an unescaped / ends the host early
    f"redis://app:{PASSWORD}#x@redis:6379/0",
    f"redis://app:{PASSWORD}?x@redis:6379/0",
    f"redis://{PASSWORD}%zz@redis:6379/0",
    f"rediss://app:{PASSWORD}@red is:6379/0",  # the rest of the URL is bad
])
@pytest.mark.parametrize("keda", [False, True])
def test_malformed_redis_url_is_refused_without_quoting_the_password(url, keda):
    values = {"keda": {"enabled": keda}}
    for redis in ({"url": url}, {"url": url, "existingSecret": "mine"}):
        msg = render_fails({**values, "redis": redis}, "redis.url")
        assert PASSWORD[:5] not in msg and "Secret" not in msg, msg


def test_schema_engine_values_are_the_ones_the_engine_takes():
    from pagedserve.engine.config import EngineConfig
    from pagedserve.service.settings import DTYPES

    schema = json.loads((CHART / "values.schema.json").read_text())
    engine = schema["properties"]["engine"]["properties"]
    with helm.Chart.load(str(CHART)) as chart:
        for dtype in engine["dtype"]["enum"]:
            EngineConfig(dtype=dtype, device="cpu")  # the engine takes every dtype the schema lets through
        assert set(engine["dtype"]["enum"]) == set(DTYPES)  # vLLM's half and float too: the worker takes them
        for dtype in ("float64", "fp64"):
            with pytest.raises(helm.HelmError):
                chart.validate_schema({"engine": {"dtype": dtype}})
        for device in ("", "auto", "cpu", "cuda", "cuda:0", "cuda:12"):  # the settings' DEVICE_PATTERN
            chart.validate_schema({"engine": {"device": device}})
        for device in ("cuda:01", "gpu", "cuda:"):
            with pytest.raises(helm.HelmError):
                chart.validate_schema({"engine": {"device": device}})
        chart.validate_schema({"prefix": "p" * 100})  # no length limit in the worker
        chart.validate_schema({"engine": {"maxModelLen": 2}})
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"engine": {"maxModelLen": 1}})
        for block_size in (1, 16, 128):
            chart.validate_schema({"engine": {"blockSize": block_size}})
            EngineConfig(block_size=block_size, device="cpu")
        for block_size in (3, 24, 256):
            with pytest.raises(helm.HelmError):
                chart.validate_schema({"engine": {"blockSize": block_size}})


def test_recreate_strategy_has_no_rolling_update():
    # the API server refuses rollingUpdate with type Recreate; values merge the default rollingUpdate in
    assert one(render({"updateStrategy": {"type": "Recreate"}}), "Deployment")["spec"]["strategy"] == {
        "type": "Recreate"}
    # maxSurge: 0 alone keeps the default maxUnavailable: 0, which the API server refuses ("may not be 0 when
    # maxSurge is 0"), and kubernetes-validate does not check
    for surge, unavailable in ((0, None), (0, 0), ("0%", "0%")):
        rolling = {"maxSurge": surge} if unavailable is None else {"maxSurge": surge, "maxUnavailable": unavailable}
        render_fails({"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": rolling}},
                     "updateStrategy.rollingUpdate.maxSurge", "updateStrategy.rollingUpdate.maxUnavailable: 1",
                     "updateStrategy.type: Recreate")
    assert one(render({"updateStrategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}}),
               "Deployment")["spec"]["strategy"] == {"type": "RollingUpdate",
                                                     "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    # Recreate leaves rollingUpdate out, so zeros there are no matter
    assert one(render({"updateStrategy": {"type": "Recreate", "rollingUpdate": {"maxSurge": 0}}}),
               "Deployment")["spec"]["strategy"] == {"type": "Recreate"}


def test_probe_initial_delays_are_rendered():
    probes = {"liveness": {"path": "/healthz", "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3,
                           "initialDelaySeconds": 120},
              "readiness": {"path": "/readyz", "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3,
                            "initialDelaySeconds": 60}}
    c = worker_container(render({"probes": probes}))
    assert c["livenessProbe"]["initialDelaySeconds"] == 120
    assert c["readinessProbe"]["initialDelaySeconds"] == 60
    c = worker_container(render({}))
    assert "initialDelaySeconds" not in c["livenessProbe"] and "initialDelaySeconds" not in c["readinessProbe"]


# ---------------------------------------------------------------- KEDA with a Secret the chart cannot read


def test_keda_with_existing_secret_needs_the_redis_address():
    """The worker takes its URL from the Secret, which the chart cannot read: KEDA polling the default host would
    watch a Redis nobody named (redis-master, database 0) and scale on nothing."""
    base = {"redis": {"existingSecret": "pagedserve-redis"}, "keda": {"enabled": True}}
    render_fails(base, "redis.existingSecret", "redis.host", "keda.address")
    md = keda_trigger({**base, "redis": {"existingSecret": "pagedserve-redis", "host": "redis.cache", "db": 2}})
    assert md["address"] == "redis.cache:6379" and md["databaseIndex"] == "2"
    md = keda_trigger({**base, "keda": {"enabled": True, "address": "10.1.2.3:6380"}})
    assert md["address"] == "10.1.2.3:6380"
    # without KEDA the Secret alone is enough; without the Secret the chart builds the URL from the default host
    assert not by_kind(render({"redis": {"existingSecret": "pagedserve-redis"}}), "ScaledObject")
    docs = render({"keda": {"enabled": True}})
    assert one(docs, "Secret")["stringData"]["redis-url"] == "redis://redis-master:6379/0"
    assert one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["address"] == "redis-master.ml:6379"


def _documented_helm_sets(text: str) -> list[dict]:
    """The --set values of every `helm install ... helm/pagedserve` command in a document (continuations joined)."""
    text = text.replace("\\\n", " ")
    out = []
    for cmd in re.findall(r"helm install \S+ helm/pagedserve[^`\n]*", text):
        values: dict = {}
        for key, value in re.findall(r"--set ([\w.]+)=(\S+)", cmd):
            node = values
            *path, last = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[last] = {"true": True, "false": False}.get(value, value)
        out.append(values)
    return out


@pytest.mark.parametrize("doc", ["README.md", "docs/deployment.md"])
def test_documented_helm_install_commands_render(doc):
    found = [v for v in _documented_helm_sets((CHART.parents[1] / doc).read_text()) if "-f " not in str(v)]
    assert any(v.get("keda", {}).get("enabled") for v in found), found
    for values in found:
        render(values)


def test_readme_names_the_metric_keda_scales_on_by_default():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["keda"]["trigger"]["metric"] == "length"
    line = next(ln for ln in (CHART.parents[1] / "README.md").read_text().splitlines() if "ScaledObject" in ln)
    assert "lag" not in line.replace("`lag`", "") and "length" in line, line


# ---------------------------------------------------------------- PodDisruptionBudget


def test_pdb_lets_drains_evict_unready_pods():
    """Readiness follows Redis: with Redis down every worker is unready, and a budget that counts unready pods as
    disruptions blocks `kubectl drain` until Redis is back."""
    for docs in (render({}), render({"podDisruptionBudget": {"minAvailable": 1}})):
        pdb = one(docs, "PodDisruptionBudget")
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        kubernetes_validate.validate(pdb, KUBE_VERSION, strict=True)
    pdb = one(render({"podDisruptionBudget": {"unhealthyPodEvictionPolicy": "IfHealthyBudget"}}), "PodDisruptionBudget")
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "IfHealthyBudget"


@pytest.mark.parametrize("min_available", [1, "50%", 0])
def test_pdb_min_available_set_alone_wins_over_the_default(min_available):
    # `--set podDisruptionBudget.minAvailable=1` leaves the default maxUnavailable: 1 in the values
    spec = one(render({"podDisruptionBudget": {"minAvailable": min_available}}), "PodDisruptionBudget")["spec"]
    assert spec["minAvailable"] == min_available and "maxUnavailable" not in spec
    spec = one(render({"podDisruptionBudget": {"maxUnavailable": "25%"}}), "PodDisruptionBudget")["spec"]
    assert spec["maxUnavailable"] == "25%" and "minAvailable" not in spec


def test_batch_trigger_without_the_service_monitor_is_flagged():
    """The batch query reads labels only the chart's ServiceMonitor (or a scrape the operator set up with the same
    labels) gives the series: without either it matches nothing and reads as no backlog."""
    values = {"keda": {"enabled": True, "minReplicaCount": 1, "batchTrigger": {"enabled": True}}}
    text = notes(values)
    assert "keda.batchTrigger" in text and 'service="rel-pagedserve"' in text, text
    assert "keda.batchTrigger" not in notes({**values, "serviceMonitor": {"enabled": True}})


# ---------------------------------------------------------------- alert rules (PrometheusRule) and the job label

ALERTS = CHART.parents[1] / "deploy" / "prometheus" / "alerts.yml"


def test_service_monitor_names_the_job_the_alert_rules_select():
    """The operator names the job after the Service (rel-pagedserve), where the rules' up{job="pagedserve-worker"}
    would match nothing and PagedserveNoWorkers fire for ever; relabelings of the user's come after the chart's."""
    own = {"targetLabel": "node", "sourceLabels": ["__meta_kubernetes_pod_node_name"]}
    sm = one(render({"serviceMonitor": {"enabled": True, "relabelings": [own]}}), "ServiceMonitor")
    relabelings = sm["spec"]["endpoints"][0]["relabelings"]
    assert relabelings[0] == {"targetLabel": "job", "replacement": "pagedserve-worker", "action": "replace"}
    assert relabelings[1:] == [own]
    assert 'up{job="pagedserve-worker"}' in ALERTS.read_text()


def test_prometheus_rule_is_the_alerts_file():
    """One set of rules: the chart's copy is deploy/prometheus/alerts.yml, byte for byte, and is what it renders."""
    assert (CHART / "files" / "alerts.yml").read_bytes() == ALERTS.read_bytes(), (
        "helm/pagedserve/files/alerts.yml differs from deploy/prometheus/alerts.yml: copy the latter over the former")
    assert not by_kind(render({}), "PrometheusRule")
    values = {"serviceMonitor": {"enabled": True},
              "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}
    rule = one(render(values), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == {"groups": yaml.safe_load(ALERTS.read_text())["groups"]}
    report = helm.lint(str(CHART), values, strict=True, namespace="ml", kube_version=f"v{KUBE_VERSION}")
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"prometheusRule": {"enabled": True, "rules": []}})


def test_prometheus_rule_without_the_service_monitor_is_flagged():
    text = notes({"prometheusRule": {"enabled": True}})
    assert "prometheusRule" in text and 'job="pagedserve-worker"' in text, text
    assert "prometheusRule" not in notes({"prometheusRule": {"enabled": True}, "serviceMonitor": {"enabled": True}})


# ---------------------------------------------------------------- tracing set up through extraConfig / extraEnv


def _worker_would_export_spans(env: dict[str, str], monkeypatch) -> bool:
    """What the worker's configure_tracing decides from these variables, without installing a global provider."""
    from pagedserve.service import telemetry

    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(telemetry._span_exporters())


@pytest.mark.parametrize("values", [
    {"extraConfig": {"OTEL_TRACES_EXPORTER": "console"}},
    {"extraConfig": {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://tempo:4318/v1/traces"}},
    {"extraConfig": {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4318"}},
    {"extraEnv": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector:4318"}]},
    {"extraEnv": [{"name": "OTEL_TRACES_EXPORTER", "value": "console"}]},
    {"opentelemetry": {"endpoint": "http://otel-collector:4318"}},
])
def test_tracing_set_up_through_extra_config_is_not_switched_off(values, monkeypatch):
    """OTEL_SDK_DISABLED=true, put in the ConfigMap while opentelemetry.endpoint is empty, turned off the
    exporter that extraConfig or extraEnv asked for: the worker ran without traces and said nothing."""
    docs = render(values)
    env = dict(one(docs, "ConfigMap")["data"])
    env.update({e["name"]: e["value"] for e in values.get("extraEnv", [])})
    assert "OTEL_SDK_DISABLED" not in env, env
    assert _worker_would_export_spans(env, monkeypatch)


def test_tracing_set_up_from_a_secret_in_extra_env_is_not_switched_off():
    ref = {"secretKeyRef": {"name": "otel", "key": "endpoint"}}
    docs = render({"extraEnv": [{"name": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "valueFrom": ref}]})
    assert "OTEL_SDK_DISABLED" not in one(docs, "ConfigMap")["data"]
    # variables from extraEnvFrom are out of the chart's sight: values.yaml says to set this with them
    docs = render({"extraEnvFrom": [{"secretRef": {"name": "otel"}}], "extraConfig": {"OTEL_SDK_DISABLED": "false"}})
    assert one(docs, "ConfigMap")["data"]["OTEL_SDK_DISABLED"] == "false"


@pytest.mark.parametrize("values", [
    {},
    {"extraConfig": {"OTEL_TRACES_EXPORTER": "none"}},
    {"extraConfig": {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}},
    {"extraEnv": [{"name": "OTEL_TRACES_EXPORTER", "value": "none"}]},
])
def test_tracing_stays_off_without_an_exporter(values, monkeypatch):
    data = one(render(values), "ConfigMap")["data"]
    assert data["OTEL_SDK_DISABLED"] == "true"
    assert not _worker_would_export_spans(dict(data), monkeypatch)


# ---------------------------------------------------------------- GPU limit written into resources


@pytest.mark.parametrize("values, asked, chart", [
    ({"resources": {"limits": {"nvidia.com/gpu": 2}}}, "resources.limits.nvidia.com/gpu: 2", "gpu.count: 1"),
    ({"resources": {"limits": {"nvidia.com/gpu": "2"}}}, "resources.limits.nvidia.com/gpu: 2", "gpu.count: 1"),
    ({"resources": {"requests": {"nvidia.com/gpu": 2}}}, "resources.requests.nvidia.com/gpu: 2", "gpu.count: 1"),
    ({"resources": {"limits": {"nvidia.com/gpu": 1}}, "engine": {"tensorParallelSize": 2}},
     "resources.limits.nvidia.com/gpu: 1", "engine.tensorParallelSize: 2"),
    ({"resources": {"limits": {"amd.com/gpu": 4}}, "gpu": {"enabled": True, "resourceName": "amd.com/gpu"}},
     "resources.limits.amd.com/gpu: 4", "gpu.count: 1"),
])
def test_gpu_limit_in_resources_that_disagrees_with_gpu_count_is_refused(values, asked, chart):
    """The chart writes the GPU limit from gpu.count and engine.tensorParallelSize: a different one written into
    resources was replaced without a word (2 GPUs asked, 1 given)."""
    render_fails(values, asked, chart, "gpu.count")


def test_gpu_limit_in_resources_that_agrees_is_kept():
    for values, gpus in (({"resources": {"limits": {"nvidia.com/gpu": 2}}, "gpu": {"enabled": True, "count": 2},
                           "engine": {"tensorParallelSize": 2}}, 2),
                         ({"resources": {"limits": {"nvidia.com/gpu": "1"}}}, 1),
                         ({"resources": {"limits": {"nvidia.com/gpu": 4}, "requests": {"nvidia.com/gpu": 4}},
                           "engine": {"tensorParallelSize": 4}}, 4)):
        docs = render(values)
        assert worker_container(docs)["resources"]["limits"]["nvidia.com/gpu"] == gpus
        for doc in docs:
            if doc["kind"] not in CRD_KINDS:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


# ---------------------------------------------------------------- the Kubernetes versions the chart admits


def _admits(constraint: str, version: str) -> bool:
    """Chart.yaml's kubeVersion (the comparisons Helm's semver constraints take, all of them ANDed) on a release
    version; a "-0" pre-release suffix only lets pre-releases of that version through, so it is dropped here."""
    def parse(v: str) -> tuple[int, ...]:
        parts = [int(p) for p in v.lstrip("v").split("-")[0].split(".")]
        return tuple(parts + [0] * (3 - len(parts)))

    ops = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b,
           "=": lambda a, b: a == b}
    clauses = re.findall(r"(>=|<=|>|<|=)?\s*(v?\d+(?:\.\d+){0,2}(?:-\S+)?)", constraint.replace(",", " "))
    assert clauses and "||" not in constraint, constraint
    return all(ops[op or "="](parse(version), parse(bound)) for op, bound in clauses)


def test_kube_version_floor_has_the_pdb_unhealthy_pod_eviction_policy():
    """unhealthyPodEvictionPolicy is alpha, behind a feature gate off by default, in Kubernetes 1.26 (beta and on
    from 1.27): a 1.26 API server drops it, and a drain blocks on unready workers again while Redis is down."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    assert not _admits(constraint, "1.26.15"), constraint
    assert _admits(constraint, "1.27.0") and _admits(constraint, KUBE_VERSION), constraint
    # every manifest is valid on the oldest Kubernetes the chart admits
    for values in VALUE_SETS.values():
        for doc in render(values):
            if doc["kind"] not in CRD_KINDS:
                kubernetes_validate.validate(doc, "1.27.0", strict=True)


def test_network_policy_admits_only_the_metrics_port_from_whom_it_names():
    """The metrics port has no authentication: with networkPolicy.enabled the workers' pods admit traffic only there,
    only from ``metricsFrom`` (none: the node alone, whose probes a NetworkPolicy always admits)."""
    assert not by_kind(render(), "NetworkPolicy")  # off by default
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    docs = render({"networkPolicy": {"enabled": True, "metricsFrom": [monitoring]}, "worker": {"metricsPort": 9500}})
    policy = one(docs, "NetworkPolicy")
    kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    pod = one(docs, "Deployment")["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule == {"from": [monitoring], "ports": [{"port": 9500, "protocol": "TCP"}]}
    ports = {p["name"]: p["containerPort"] for p in worker_container(docs)["ports"]}
    assert ports["metrics"] == 9500
    closed = one(render({"networkPolicy": {"enabled": True}}), "NetworkPolicy")
    kubernetes_validate.validate(closed, KUBE_VERSION, strict=True)
    assert closed["spec"]["ingress"] == [] and closed["spec"]["policyTypes"] == ["Ingress"]


def test_a_network_policy_that_would_block_the_service_monitor_is_refused():
    """networkPolicy.enabled with an empty metricsFrom beside serviceMonitor.enabled rendered a policy that refused
    every scrape: each worker down in Prometheus, its alerts firing, and keda.batchTrigger reading no backlog."""
    render_fails({"networkPolicy": {"enabled": True}, "serviceMonitor": {"enabled": True}},
                 "networkPolicy.metricsFrom", "serviceMonitor", "namespaceSelector")
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    one(render({"networkPolicy": {"enabled": True, "metricsFrom": [monitoring]}, "serviceMonitor": {"enabled": True}}),
        "NetworkPolicy")
    render_fails({"networkPolicy": {"enabled": True, "metricsFrom": "monitoring"}}, "metricsFrom")


# ---------------------------------------------------------------- values the API server (or the pod) would refuse


def test_pdb_max_unavailable_zero_is_kept():
    # 0 is a budget (no voluntary eviction at all), not "unset": `default` would have turned it into 1
    pdb = one(render({"podDisruptionBudget": {"maxUnavailable": 0}}), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 0 and "minAvailable" not in pdb["spec"]
    kubernetes_validate.validate(pdb, KUBE_VERSION, strict=True)
    assert one(render({"podDisruptionBudget": {"maxUnavailable": None}}), "PodDisruptionBudget")["spec"][
        "maxUnavailable"] == 1


@pytest.mark.parametrize("parts", [{"password": "oldpw"}, {"username": "someone-else"},
                                   {"username": "someone-else", "password": "oldpw"}])
def test_redis_url_credentials_win_over_the_parts(parts):
    """redis.url wins over the parts: the worker logs in with the URL's user and password, and so must KEDA (a
    redis.password left beside the URL had KEDA log in with it: WRONGPASS, and the fleet never scaled)."""
    url = "redis://pagedserve-worker:url%40pw@redis-master.redis:6379/0"
    docs = render({"redis": {"url": url, **parts}, "keda": {"enabled": True}})
    secret = one(docs, "Secret")["stringData"]
    assert secret["redis-url"] == url
    assert (secret["redis-username"], secret["redis-password"]) == ("pagedserve-worker", "url@pw")
    ta = one(docs, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {(r["parameter"], r["key"]) for r in ta} == {("password", "redis-password"),
                                                        ("username", "redis-username")}
    # a URL without credentials: KEDA logs in as the worker does, with none
    docs = render({"redis": {"url": "redis://redis-master.redis:6379/0", **parts}, "keda": {"enabled": True}})
    assert not {"redis-password", "redis-username"} & set(one(docs, "Secret")["stringData"])
    assert not by_kind(docs, "TriggerAuthentication")


@pytest.mark.parametrize("url", ["redis://:pw@redis-master.redis:6379?db=3", "redis://:pw@redis-master.redis:6379/1?db=3",
                                 "redis://:pw@redis-master.redis:6379/1?x=1&db=&db=3&db=4",
                                 "redis://:pw@redis-master.redis:6379/5?db=", "redis://:pw@redis-master.redis:6379/5",
                                 "redis://:pw@redis-master.redis:6379", "redis://:pw@redis-master.redis:6379/"])
def test_keda_polls_the_database_redis_py_reads_from_the_url(url):
    connection = pytest.importorskip("redis.connection")
    want = str(connection.parse_url(url).get("db", 0))  # what the worker (redis-py) selects
    md = keda_trigger({"redis": {"url": url}})
    assert md.get("databaseIndex", "0") == want, md
    assert f"@redis-master.redis:6379/{want}'" in notes({"redis": {"url": url}})


def test_redis_url_db_query_that_is_no_number_is_refused():
    # redis-py refuses it at connect; KEDA would poll some other database meanwhile
    render_fails({"redis": {"url": "redis://:pw@redis-master.redis:6379/1?db=x"}, "keda": {"enabled": True}},
                 "redis.url", "?db=")


@pytest.mark.parametrize("values, needles", [
    ({"cache": {"mountPath": "/tmp"}}, ["cache.mountPath", "/tmp"]),
    ({"cache": {"mountPath": "/tmp/"}}, ["cache.mountPath", "/tmp"]),
    ({"cache": {"mountPath": "/dev/shm"}}, ["cache.mountPath", "/dev/shm", "shm.enabled"]),
    ({"cache": {"mountPath": "/models"}, "model": {"existingClaim": "w", "path": "/models/m"}},
     ["model.mountPath", "cache.mountPath"]),
    ({"model": {"existingClaim": "w", "mountPath": "/dev/shm", "path": "/dev/shm/m"}},
     ["model.mountPath", "/dev/shm", "shm.enabled"]),
    ({"model": {"existingClaim": "w", "mountPath": "/tmp", "path": "/tmp/m"}}, ["model.mountPath", "/tmp"]),
    ({"extraVolumes": [{"name": "x", "emptyDir": {}}], "extraVolumeMounts": [{"name": "x", "mountPath": "/tmp"}]},
     ["extraVolumeMounts[0].mountPath", "/tmp"]),
])
def test_mount_path_collisions_are_refused(values, needles):
    # each mountPath of a container must be unique: the API server refuses the Deployment otherwise
    render_fails(values, *needles)


def test_mount_paths_apart_render():
    docs = render({"shm": {"enabled": False}, "cache": {"mountPath": "/dev/shm"}})
    assert {"name": "cache", "mountPath": "/dev/shm"} in worker_container(docs)["volumeMounts"]
    c = worker_container(render({"cache": {"mountPath": "/tmp/cache"}}))  # below /tmp is another path
    paths = [m["mountPath"] for m in c["volumeMounts"]]
    assert len(paths) == len(set(paths)) and "/tmp/cache" in paths


@pytest.mark.parametrize("name, instead", [
    ("HF_HOME", "cache.mountPath"), ("XDG_CACHE_HOME", "cache.mountPath"), ("TRITON_CACHE_DIR", "cache.mountPath"),
    ("TORCH_EXTENSIONS_DIR", "cache.mountPath"), ("CUDA_CACHE_PATH", "cache.mountPath"),
    ("POD_NAME", "downward API"), ("POD_NAMESPACE", "downward API"), ("NODE_NAME", "downward API"),
])
def test_extra_config_variables_the_pod_env_sets_are_refused(name, instead):
    # the pod sets these in env, which wins over the ConfigMap (envFrom): extraConfig's would never arrive
    render_fails({"extraConfig": {name: "/x"}}, f"extraConfig.{name}", "env", instead)


@pytest.mark.parametrize("name", ["PAGEDSERVE_WORKER_NAME", "pagedserve_worker_name"])
def test_a_worker_name_for_every_replica_is_refused(name):
    """One ConfigMap serves every replica: a worker name there gave all of them one consumer name, and each worker
    past the first exits when it finds the name held by a live one (a rollout's surge pod never ready)."""
    render_fails({"extraConfig": {name: "worker-1"}}, f"extraConfig.{name}", "consumer name", "hostname")


def test_a_worker_name_in_extra_env_is_refused_unless_each_pod_gets_its_own():
    render_fails({"extraEnv": [{"name": "PAGEDSERVE_WORKER_NAME", "value": "w"}]}, "extraEnv PAGEDSERVE_WORKER_NAME",
                 "consumer name", "valueFrom")
    docs = render({"extraEnv": [{"name": "PAGEDSERVE_WORKER_NAME",
                                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]})
    env = {e["name"]: e for e in worker_container(docs)["env"]}
    assert env["PAGEDSERVE_WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_every_variable_of_the_pod_env_is_refused_in_extra_config():
    env = {e["name"] for e in worker_container(render({"cpuBind": "0-3"}))["env"]}
    for name in sorted(env - {"OTEL_RESOURCE_ATTRIBUTES"}):
        render_fails({"extraConfig": {name: "1"}}, f"extraConfig.{name}")


def test_extra_config_resource_attributes_are_appended_to_the_pods(monkeypatch):
    """The chart has no value of its own for resource attributes: extraConfig's are appended to the pod's env
    variable (which would otherwise hide them), and win for a key both name."""
    docs = render({"extraConfig": {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.instance.id=w1"}})
    assert "OTEL_RESOURCE_ATTRIBUTES" not in one(docs, "ConfigMap")["data"]
    value = {e["name"]: e.get("value") for e in worker_container(docs)["env"]}["OTEL_RESOURCE_ATTRIBUTES"]
    assert value.startswith("k8s.pod.name=$(POD_NAME),") and value.endswith(
        ",deployment.environment=prod,service.instance.id=w1"), value
    resources = pytest.importorskip("opentelemetry.sdk.resources")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", value.replace("$(POD_NAME)", "p").replace("$(POD_NAMESPACE)", "ml")
                       .replace("$(NODE_NAME)", "n"))
    attrs = resources.Resource.create().attributes
    assert attrs["deployment.environment"] == "prod" and attrs["service.instance.id"] == "w1"
    assert attrs["k8s.pod.name"] == "p"


def test_cuda_device_needs_the_gpu():
    # gpu.enabled: false renders the CPU image and asks for no GPU: a CUDA worker could not start
    render_fails({"gpu": {"enabled": False}, "engine": {"device": "cuda"}}, "engine.device", "gpu.enabled")
    assert one(render({"gpu": {"enabled": False}, "engine": {"device": "cpu"}}), "ConfigMap")["data"][
        "PAGEDSERVE_DEVICE"] == "cpu"


@pytest.mark.parametrize("model, needles", [
    ({"existingClaim": "llm-weights"}, ["model.path", "model.existingClaim"]),
    ({"volume": {"hostPath": {"path": "/srv/m"}}}, ["model.path", "model.volume"]),
    ({"existingClaim": "llm-weights", "path": "/data/llama"}, ["model.path", "model.mountPath"]),
    ({"existingClaim": "llm-weights", "path": "/models2/llama"}, ["model.path", "model.mountPath"]),
    ({"existingClaim": "llm-weights", "path": "llama"}, ["model.path", "model.mountPath"]),
])
def test_model_volume_needs_a_model_path_inside_it(model, needles):
    # without PAGEDSERVE_MODEL the worker serves the image's (or the default) model, never the mounted weights
    render_fails({"model": model}, *needles)
    for path in ("/models", "/models/llama", "/models/llama/"):
        data = one(render({"model": {"existingClaim": "llm-weights", "path": path}}), "ConfigMap")["data"]
        assert data["PAGEDSERVE_MODEL"] == path
    # no volume: a model baked into the image may be anywhere
    assert one(render({"model": {"path": "/opt/pagedserve/models/m"}}), "ConfigMap")["data"][
        "PAGEDSERVE_MODEL"] == "/opt/pagedserve/models/m"


def test_tensor_parallel_needs_shared_memory():
    # the ranks exchange tensors through /dev/shm, which is 64 MiB without the chart's emptyDir
    render_fails({"engine": {"tensorParallelSize": 2}, "shm": {"enabled": False}},
                 "engine.tensorParallelSize", "shm.enabled")
    render({"engine": {"tensorParallelSize": 1}, "shm": {"enabled": False}})
    own = {"engine": {"tensorParallelSize": 2}, "shm": {"enabled": False},
           "extraVolumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
           "extraVolumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}]}
    assert {"name": "shm", "mountPath": "/dev/shm"} in worker_container(render(own))["volumeMounts"]


@pytest.mark.parametrize("bad", [
    {"podDisruptionBudget": {"maxUnavailable": "one"}}, {"podDisruptionBudget": {"maxUnavailable": -1}},
    {"podDisruptionBudget": {"minAvailable": "50"}}, {"podDisruptionBudget": {"minAvailable": -2}},
    {"shm": {"sizeLimit": "8GB"}}, {"shm": {"sizeLimit": -1}}, {"shm": {"sizeLimit": "-1Gi"}},
    {"cache": {"sizeLimit": "10 Gi"}}, {"cache": {"sizeLimit": "lots"}},
])
def test_schema_rejects_budgets_and_sizes_the_api_server_refuses(bad):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(bad)


@pytest.mark.parametrize("good", [
    {"podDisruptionBudget": {"maxUnavailable": 0}}, {"podDisruptionBudget": {"maxUnavailable": "25%"}},
    {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": None}}, {"shm": {"sizeLimit": "1.5Gi"}},
    {"shm": {"sizeLimit": "512Mi"}}, {"cache": {"sizeLimit": "10G"}}, {"cache": {"sizeLimit": ""}},
    {"cache": {"sizeLimit": 1073741824}},
])
def test_schema_takes_budgets_and_sizes_the_api_server_takes(good):
    docs = render(good)
    for doc in docs:
        if doc["kind"] in ("Deployment", "PodDisruptionBudget"):
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values, where", [
    ({"extraConfig": {"PAGEDSERVE_METRICS_HOST": "127.0.0.1"}}, "extraConfig.PAGEDSERVE_METRICS_HOST"),
    ({"extraEnv": [{"name": "PAGEDSERVE_METRICS_HOST", "value": "localhost"}]}, "extraEnv PAGEDSERVE_METRICS_HOST"),
    ({"extraEnv": [{"name": "pagedserve_metrics_host", "value": "::1"}]}, "extraEnv pagedserve_metrics_host"),
    ({"extraEnv": [{"name": "PAGEDSERVE_METRICS_HOST", "value": "::ffff:127.0.0.1"}]}, "extraEnv PAGEDSERVE_METRICS_HOST"),
])
def test_a_metrics_host_the_probes_cannot_reach_is_refused(values, where):
    """The kubelet probes the pod's IP: a worker bound to 127.0.0.1 failed its startup probe for its whole budget
    and restarted for ever, a rollout with maxUnavailable 0 stalled (held-out operator)."""
    render_fails(values, where, "loopback", "probes", "0.0.0.0", "::")


@pytest.mark.parametrize("host", [
    "localhost.", "LocalHost", "localhost.localdomain", "localhost.localdomain.", "ip6-loopback", "app.localhost",
    "::0:1", "0::1", "0000:0000:0000:0000:0000:0000:0000:0001", "0:0:0:0:0:0:0:1", "[0::0001]", "::1%lo", "::0.0.0.1",
    "127.1", "127.255.255.254", "0177.0.0.1", "0x7F.0.0.1", "2130706433", "0x7f000001", "::ffff:7f00:1",
    "0:0:0:0:0:ffff:127.0.0.1", "[::ffff:127.0.0.1]",
])
def test_every_spelling_of_the_loopback_is_refused_as_a_metrics_host(host):
    """The resolver reads these as the loopback too (a trailing dot, a case, zero groups written out, inet_aton's
    short, octal, hex and one-number forms): only a few exact spellings were refused, the rest bound the loopback
    as 127.0.0.1 did (held-out tester)."""
    render_fails({"extraEnv": [{"name": "PAGEDSERVE_METRICS_HOST", "value": host}]}, "extraEnv PAGEDSERVE_METRICS_HOST",
                 "loopback", repr(host).replace("'", '"'))
    render_fails({"extraConfig": {"PAGEDSERVE_METRICS_HOST": host}}, "extraConfig.PAGEDSERVE_METRICS_HOST", "loopback")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "$(POD_IP)", "10.0.0.5", "fd00::1", "::2", "1::1", "::10",
                                  "127", "128.0.0.1", "2147483648", "::ffff:10.0.0.1", "::ffff:8f00:1"])
def test_a_metrics_host_the_probes_reach_is_taken(host):
    """All interfaces (the worker reads an empty value as all, as http.server does) or the pod's own IP."""
    docs = render({"extraEnv": [{"name": "PAGEDSERVE_METRICS_HOST", "value": host}]})
    assert {"name": "PAGEDSERVE_METRICS_HOST", "value": host} in worker_container(docs)["env"]


@pytest.mark.parametrize("values, words", [
    ({"probes": {"readiness": {"path": "/ready", "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3}}},
     "at '/probes/readiness/path'"),
    ({"probes": {"liveness": {"path": "/healthz/", "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": 3}}},
     "at '/probes/liveness/path'"),
    ({"worker": {"terminationGraceMarginSeconds": 0}}, "at '/worker/terminationGraceMarginSeconds'"),
])
def test_a_probe_path_the_worker_does_not_serve_and_no_margin_to_hand_back_are_refused(values, words):
    """A probe path other than /healthz or /readyz is a 404 (never ready, or a restart loop); a margin of 0 let
    SIGKILL come at the end of the drain, before the worker handed its unfinished requests back (held-out
    operator)."""
    with pytest.raises(helm.HelmError) as e:
        render(values)
    assert words in str(e.value), e.value


def test_a_private_ca_reaches_kedas_trigger_authentication():
    """A TLS Redis signed by a private CA: the trigger had enableTLS but no CA, KEDA's handshake failed and the
    workers sat at fallback.replicas; the docs said to add the CA to the chart's own TriggerAuthentication by hand,
    which the next upgrade removed (held-out operator)."""
    values = {"redis": {"url": "rediss://:pw@redis.r.svc:6380/0?ssl_ca_certs=/etc/redis-tls/ca.crt"},
              "keda": {"enabled": True, "caSecret": {"name": "redis-ca", "key": "ca.pem"}}}
    docs = render(values)
    (auth,) = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert refs["ca"] == {"parameter": "ca", "name": "redis-ca", "key": "ca.pem"} and "password" in refs
    (so,) = [d for d in docs if d["kind"] == "ScaledObject"]
    assert all(t["metadata"]["enableTLS"] == "true" for t in so["spec"]["triggers"] if t["type"].startswith("redis"))
    # without a password the CA alone makes the TriggerAuthentication
    docs = render({"redis": {"url": "rediss://redis.r.svc:6380/0"},
                   "keda": {"enabled": True, "caSecret": {"name": "redis-ca"}}})
    (auth,) = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    assert [r["parameter"] for r in auth["spec"]["secretTargetRef"]] == ["ca"]
    render_fails({"redis": {"url": "redis://redis.r.svc:6379/0"}, "keda": {"enabled": True, "caSecret": {"name": "c"}}},
                 "keda.caSecret is for a TLS Redis")
    docs = render({"redis": {"url": "rediss://:pw@redis.r.svc:6380/0"}, "keda": {"enabled": True, "caSecret": None}})
    (auth,) = [d for d in docs if d["kind"] == "TriggerAuthentication"]  # null: no CA, as an empty name
    assert [r["parameter"] for r in auth["spec"]["secretTargetRef"]] == ["password"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/healthz?verbose=1"])
def test_a_probe_path_the_worker_serves_is_taken(path):
    """The worker serves /metrics too and ignores a query string: refusing them broke values that worked (the
    regression hunter's)."""
    docs = render({"probes": {"liveness": {"path": path, "periodSeconds": 5, "timeoutSeconds": 5,
                                           "failureThreshold": 3}}})
    assert worker_container(docs)["livenessProbe"]["httpGet"]["path"] == path
