"""deploy/: what can be checked without a container engine or a cluster.

promtool checks the Prometheus config and rules and runs the rules' unit tests; the
dashboard JSON is the output of its generator and uses only metrics a running worker
exports; the compose file, Dockerfile and Kubernetes manifests are parsed and
cross-checked: every command parses with the real CLI, every config they carry loads with
the real config loader, every port and path agrees with the service on the other end.
Not run here (no Docker engine, no cluster, no Grafana): see deploy/README.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from processor import __version__
from processor.apps.cli import build_parser
from processor.config import Config, env_overrides, from_mapping, load
from tests.procs import ROOT, cli, free_port, process, worker_env

pytestmark = pytest.mark.timeout(60)

DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "swarm-aggregator.json"
K8S = DEPLOY / "k8s"
OUR_IMAGE = "swarm-aggregator"


def ci_or_skip(msg: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def load_yaml(path: Path) -> list[Any]:
    """Every document of a YAML file: PyYAML if importable, else Debian's python3-yaml."""
    text = path.read_text()
    try:
        import yaml
    except ImportError:
        pass
    else:
        return list(yaml.safe_load_all(text))
    script = ("import json, sys, yaml; "
              "json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout, default=str)")
    for python in ("/usr/bin/python3", shutil.which("python3")):
        if python and Path(python).exists():
            r = subprocess.run([python, "-c", script], input=text, check=False, capture_output=True,
                               text=True, timeout=30)
            if r.returncode == 0:
                docs: list[Any] = json.loads(r.stdout)
                return docs
    ci_or_skip("no YAML parser: pip install pyyaml (or apt-get install python3-yaml)")
    raise AssertionError("unreachable")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        ci_or_skip("'promtool' not found: apt-get install prometheus")
    return subprocess.run([binary, *args], check=False, capture_output=True, text=True, timeout=60,
                          cwd=PROM_DIR)


# -- Prometheus -----------------------------------------------------------------------------

def test_promtool_check_config_and_rules():
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout


def test_promtool_unit_tests_fire_every_alert():
    r = promtool("test", "rules", "alerts.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    (rules,) = load_yaml(PROM_DIR / "alerts.yml")
    alerts = {rule["alert"] for g in rules["groups"] for rule in g["rules"]}
    (tests,) = load_yaml(PROM_DIR / "alerts.test.yml")
    fired = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]
             if case.get("exp_alerts")}
    assert fired == alerts, f"alerts without a firing unit test: {alerts - fired}"
    for g in rules["groups"]:
        for rule in g["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert re.fullmatch(r"\d+m", rule["for"]), "durations in minutes (see the file)"


def test_the_compose_prometheus_scrapes_the_worker_and_loads_the_rules():
    (cfg,) = load_yaml(PROM_DIR / "prometheus.yml")
    assert cfg["rule_files"] == ["alerts.yml"]
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "swarm-aggregator"  # the alerts' up{job=~".*swarm-aggregator.*"}
    (target,) = job["static_configs"][0]["targets"]
    worker_cfg = load(DEPLOY / "config" / "worker.toml", environ={})
    assert target == f"worker:{worker_cfg.metrics.port}"


# -- Grafana --------------------------------------------------------------------------------

def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def test_dashboard_is_valid_and_generated_from_its_source():
    board = json.loads(DASHBOARD.read_text())
    r = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "make_dashboard.py"),
                        "--check"],
                       check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert board["uid"] == "swarm-aggregator" and board["title"]
    ps = panels(board)
    assert len({p["id"] for p in ps}) == len(ps)
    titles = {p["title"] for p in ps}
    for wanted in ("Throughput", "Step latency", "Window outcomes",
                   "Rejected messages by reason", "Contribution share per model",
                   "Open windows"):
        assert wanted in titles
    for p in ps:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        assert p.get("description"), p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert t["expr"]
    latency = next(p for p in ps if p["title"] == "Step latency")
    assert [t["legendFormat"].split()[0] for t in latency["targets"]] == ["p50", "p90", "p99"]
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "job", "instance"]


def exported_names(text: str) -> set[str]:
    """Every sample name the exposition can carry, read from its families."""
    names = set()
    for f in text_string_to_metric_families(text):
        names |= {s.name for s in f.samples}
        if f.type == "counter":
            names.add(f.name + "_total")
        elif f.type == "histogram":
            names |= {f.name + "_bucket", f.name + "_sum", f.name + "_count"}
        else:
            names.add(f.name)
    return names


def test_every_metric_of_the_dashboard_and_the_rules_is_exported_by_a_running_worker():
    from tests.test_prometheus import PROMETHEUS_OWN, grafana_vars, metric_names

    mport = free_port()
    env = worker_env(transport__zmq__sub=f"tcp://127.0.0.1:{free_port()}",
                     transport__zmq__pub=f"tcp://127.0.0.1:{free_port()}",
                     metrics__port=mport, log__level="ERROR")
    with process(cli("run"), env):
        text = ""
        for _ in range(150):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2) as r:
                    text = r.read().decode()
                break
            except OSError:
                time.sleep(0.1)
    assert text, "the worker never served /metrics"
    exported = exported_names(text)
    board = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for p in panels(board):
        for t in p.get("targets", []):
            used |= metric_names(grafana_vars(t["expr"]))
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            used |= metric_names(grafana_vars(v["query"].split("(", 1)[1].rsplit(",", 1)[0]))
    assert len(used) >= 10
    assert used <= exported, f"not exported: {used - exported}"
    (rules,) = load_yaml(PROM_DIR / "alerts.yml")
    for g in rules["groups"]:
        for rule in g["rules"]:
            missing = metric_names(rule["expr"]) - exported - PROMETHEUS_OWN
            assert not missing, (rule["alert"], missing)


def test_grafana_provisioning_points_at_the_compose_services():
    (compose,) = load_yaml(DEPLOY / "compose.yaml")
    (ds,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    listen = next(a for a in compose["services"]["prometheus"]["command"]
                  if a.startswith("--web.listen-address="))
    assert source["url"] == f"http://prometheus:{listen.rsplit(':', 1)[1]}"
    (prom_cfg,) = load_yaml(PROM_DIR / "prometheus.yml")
    assert source["jsonData"]["timeInterval"] == prom_cfg["global"]["scrape_interval"]
    (dp,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" /
                      "swarm-aggregator.yaml")
    path = dp["providers"][0]["options"]["path"]
    mounts = mount_map(compose["services"]["grafana"])
    assert mounts[path] == DASHBOARD.parent
    home = compose["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert resolve(mounts, home) == DASHBOARD
    assert (resolve(mounts, "/etc/grafana/provisioning/datasources/prometheus.yaml")
            .exists())


# -- compose and the image ------------------------------------------------------------------

def mount_map(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    out = {}
    for v in service.get("volumes", []):
        host, container = v.split(":")[:2]
        if host.startswith("."):
            out[container] = (DEPLOY / host).resolve()
    return out


def resolve(mounts: dict[str, Path], container_path: str) -> Path:
    for c, h in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if container_path == c or container_path.startswith(c.rstrip("/") + "/"):
            return h / container_path[len(c):].lstrip("/")
    raise AssertionError(f"{container_path} is not mounted")


def parse_cli(argv: list[str]) -> Any:
    return build_parser().parse_args(argv)


def endpoint_port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_compose_brings_up_a_complete_consistent_pipeline():
    (compose,) = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"proxy", "worker", "loadgen", "prometheus", "grafana"}
    ours = {n: s for n, s in services.items() if s["image"].startswith(OUR_IMAGE + ":")}
    assert set(ours) == {"proxy", "worker", "loadgen"}
    for name, s in services.items():
        image = s["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: pin the image ({image})"
        if name in ours:
            ctx = (DEPLOY / s["build"]["context"]).resolve()
            assert ctx == ROOT
            assert (ctx / s["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        else:
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), image
        for port in s.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for host in mount_map(s).values():
            assert host.exists(), host
    # every command is one the CLI accepts
    proxy = parse_cli(services["proxy"]["command"])
    worker_args = parse_cli(services["worker"]["command"])
    loadgen = parse_cli(services["loadgen"]["command"])
    assert (proxy.command, worker_args.command, loadgen.command) == ("proxy", "run", "loadgen")
    # the worker's config file loads (with compose's environment on top) and agrees
    w = services["worker"]
    cfg_path = resolve(mount_map(w), worker_args.config)
    env = {k: str(v) for k, v in w.get("environment", {}).items()}
    assert all(k.startswith("SWARM_AGG__") for k in env)
    cfg = load(cfg_path, environ=env)
    z = cfg.transport.zmq
    assert cfg.transport.kind == "zmq" and not z.sub_bind and not z.pub_bind
    assert z.sub == f"tcp://proxy:{endpoint_port(proxy.xpub)}"
    assert z.pub == f"tcp://proxy:{endpoint_port(proxy.xsub)}"
    assert loadgen.pub == f"tcp://proxy:{endpoint_port(proxy.xsub)}"
    assert loadgen.sub == f"tcp://proxy:{endpoint_port(proxy.xpub)}"
    assert proxy.xsub.startswith("tcp://0.0.0.0:") and proxy.xpub.startswith("tcp://0.0.0.0:")
    assert cfg.window.key == ["ENV_ID", "STEP"]  # loadgen keys its steps so
    assert cfg.window.models == loadgen.models and cfg.window.timeout_ms > 0
    assert cfg.metrics.host == "0.0.0.0"
    assert w["ports"] == [f"127.0.0.1:{cfg.metrics.port}:{cfg.metrics.port}"]
    # the containers without a metrics server do not run the image's health check
    for name in ("proxy", "loadgen"):
        assert services[name]["healthcheck"] == {"disable": True}
    # Prometheus gets its config and rules from deploy/prometheus
    prom_mounts = mount_map(services["prometheus"])
    config_arg = next(a for a in services["prometheus"]["command"]
                      if a.startswith("--config.file="))
    assert resolve(prom_mounts, config_arg.split("=", 1)[1]) == PROM_DIR / "prometheus.yml"
    assert (PROM_DIR / "alerts.yml").exists()


def test_docker_compose_config_when_docker_compose_is_installed():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], check=False,
                                        capture_output=True, timeout=30).returncode != 0:
        pytest.skip("docker compose is not installed: compose.yaml was checked by parsing")
    r = subprocess.run([docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config",
                        "--quiet"], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_slim_non_root_cpu_torch_with_a_healthcheck():
    ins = dockerfile()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms and all("-slim" in f for f in froms)
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    uid = int(users[-1].split(":")[0])
    # torch: the CPU build, the Makefile's pin
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    make_pin = re.search(r"torch==([\w.]+)", (ROOT / "Makefile").read_text())
    assert make_pin and args["TORCH_VERSION"] == make_pin.group(1)
    torch_run = next(rest for word, rest in ins if word == "RUN" and "torch==" in rest)
    assert "download.pytorch.org/whl/cpu" in torch_run
    # what is copied exists, and the ignore file lets exactly that in
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for word, rest in ins:
        if word == "COPY" and not rest.startswith("--from"):
            for src in shlex.split(rest)[:-1]:
                assert (ROOT / src).exists(), src
                assert f"!{src}" in ignore or f"!{src}/" in ignore, src
    # the health check asks /healthz on the default metrics port
    (hc,) = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert "/healthz" in hc and f"'{Config().metrics.port}'" in hc
    exposed = {int(p) for word, rest in ins if word == "EXPOSE" for p in rest.split()}
    z = Config().transport.zmq
    assert exposed == {Config().metrics.port, endpoint_port(z.sub), endpoint_port(z.pub)}
    entry = json.loads(next(rest for word, rest in ins if word == "ENTRYPOINT"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == [next(iter(scripts))]
    cmd = json.loads(next(rest for word, rest in ins if word == "CMD"))
    assert parse_cli(cmd).command == "run"
    # the Kubernetes pod runs as that user too
    dep = k8s("Deployment")
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


# -- Kubernetes -----------------------------------------------------------------------------

def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in load_yaml(path) if d]
    return docs


def k8s(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_docs() if d["kind"] == kind]
    return doc


def test_kubernetes_manifests_agree_with_each_other_and_the_config():
    kinds = sorted(d["kind"] for d in k8s_docs())
    assert kinds == ["ConfigMap", "Deployment", "Kustomization", "PodMonitor", "Service"]
    kust = k8s("Kustomization")
    for res in kust["resources"]:
        assert (K8S / res).exists(), res
    assert kust["images"] == [{"name": OUR_IMAGE, "newTag": __version__}]
    dep, svc, cm, pm = k8s("Deployment"), k8s("Service"), k8s("ConfigMap"), k8s("PodMonitor")
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = pod["spec"]["containers"]
    assert c["image"] == OUR_IMAGE
    args = parse_cli(c["args"])
    assert args.command == "run"
    # the config: mounted where -c points, and valid for the real loader
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == "config"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    assert os.path.dirname(args.config) == mount["mountPath"]
    key = os.path.basename(args.config)
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    cfg = from_mapping(merge(tomllib.loads(cm["data"][key]), env_overrides(env)))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == cfg.metrics.port and cfg.metrics.host == "0.0.0.0"
    assert cfg.transport.kind == "zmq" and cfg.transport.zmq.sub_bind
    assert ports["logits"] == endpoint_port(cfg.transport.zmq.sub)
    assert ports["actions"] == endpoint_port(cfg.transport.zmq.pub)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == cfg.metrics.port
    assert ann["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # the Service and the PodMonitor find the pod and its ports by name
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= set(ports)


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def test_kubectl_kustomize_renders_the_manifests_offline():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests were checked by parsing")
    r = subprocess.run([kubectl, "kustomize", str(K8S)], check=False, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    kinds = re.findall(r"(?m)^kind: (\w+)$", r.stdout)
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Service"]
    assert f"image: {OUR_IMAGE}:{__version__}" in r.stdout


def test_deploy_readme_says_how_to_start_and_what_was_not_run():
    text = (DEPLOY / "README.md").read_text()
    assert "docker compose up" in text
    assert "swarm-aggregator top" in text
    assert "Not validated here" in text
