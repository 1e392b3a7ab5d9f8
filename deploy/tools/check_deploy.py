"""Consistency checks across the deployment files, run by .ci/lint-deploy.sh.

Schema validators see one file at a time; this script checks what ties the files
together: the metric names the dashboard and the autoscaler query exist on the server,
the Service, ServiceMonitor, PDB and HPA point at the Deployment, the compose stack's
Prometheus scrapes the server and Grafana finds its dashboard, the policy-set
ConfigMap is a valid policy set, and the LeaderWorkerSet of a family over several ranks
(deploy/k8s-distributed) has as many pods as its policy set has ranks.

Usage: python deploy/tools/check_deploy.py --rendered <output of `kubectl kustomize`>
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from check_dashboard import ROOT, Problems, check_dashboard, check_metric_list, unavailable

DEPLOY = ROOT / "deploy"
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
# After the drain, the server ends the streams left and stops the engine: 10 s for both.
END_OF_DRAIN_S = 10

# ------------------------------------------------------------------ compose and friends


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def provisioned_datasources() -> dict[str, dict[str, Any]]:
    folder = DEPLOY / "grafana" / "provisioning" / "datasources"
    sources: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.yaml")):
        for source in load_yaml(path).get("datasources", []):
            sources[source["uid"]] = source
    return sources


def mount_sources(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a compose service: container path -> host path (relative)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def check_compose() -> Problems:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services: dict[str, dict[str, Any]] = compose["services"]
    problems: Problems = []
    server = services.get("mpo", {})
    build = server.get("build", {})
    if not (DEPLOY / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).is_file():
        problems.append("compose: the mpo service's build does not reach the Dockerfile")
    if build.get("args", {}).get("RUNTIME") != "cpu":
        problems.append("compose: the mpo service must build the CPU target (RUNTIME: cpu)")
    env = dict(item.split("=", 1) for item in server.get("environment", []) if "=" in item)
    drain = float(env.get("MPO_DRAIN_TIMEOUT_S", 30))
    grace = str(server.get("stop_grace_period", "10s"))
    if not grace.endswith("s") or float(grace[:-1]) != drain + END_OF_DRAIN_S:
        problems.append(
            f"compose: mpo's stop_grace_period is {grace}, not MPO_DRAIN_TIMEOUT_S ({drain:g} s)"
            f" + {END_OF_DRAIN_S} s"
        )
    for name, service in services.items():
        for target, source in mount_sources(service).items():
            if not (DEPLOY / source).exists():
                problems.append(f"compose: {name} mounts missing {source} at {target}")
    return problems + check_scraping(services) + check_grafana(services)


def check_scraping(services: dict[str, dict[str, Any]]) -> Problems:
    problems: Problems = []
    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    scraped = [
        (job, target)
        for job in prometheus["scrape_configs"]
        for config in job.get("static_configs", [])
        for target in config["targets"]
    ]
    if ("mpo", "mpo:8000") not in [(j["job_name"], t) for j, t in scraped]:
        problems.append("prometheus.yml: no job `mpo` scraping mpo:8000")
    for job, target in scraped:
        host = target.split(":")[0]
        if host not in services and host != "localhost":
            problems.append(f"prometheus.yml: job {job['job_name']} scrapes unknown {host}")
    return problems


def check_grafana(services: dict[str, dict[str, Any]]) -> Problems:
    problems: Problems = []
    for uid, datasource in provisioned_datasources().items():
        host = re.sub(r"^https?://([^:/]+).*$", r"\1", datasource["url"])
        if host not in services:
            problems.append(f"grafana datasource {uid}: {host} is no compose service")
    providers = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "mpo.yaml")
    grafana_mounts = mount_sources(services.get("grafana", {}))
    for provider in providers["providers"]:
        folder = grafana_mounts.get(provider["options"]["path"])
        if folder is None or not list((DEPLOY / folder).glob("*.json")):
            problems.append(f"grafana provider {provider['name']}: its path holds no dashboard")
    return problems


# ---------------------------------------------------------------------------- kubernetes


def index(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_workload(deploy: dict[str, Any], objects: dict[str, dict[str, Any]]) -> Problems:
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    problems: Problems = []
    if not selects(deploy["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"]):
        problems.append("Deployment: selector does not match its pod labels")
    limits = container.get("resources", {}).get("limits", {})
    if "nvidia.com/gpu" not in limits:
        problems.append("Deployment: no GPU limit (nvidia.com/gpu)")
    for section in ("requests", "limits"):
        for key, value in container.get("resources", {}).get(section, {}).items():
            if not QUANTITY.match(str(value)):
                problems.append(f"Deployment: {section}.{key}={value!r} is no quantity")
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != "/health" or get.get("port") not in port_names:
            problems.append(f"Deployment: {probe} must GET /health on a named container port")
    startup = container.get("startupProbe", {})
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 600:
        problems.append("Deployment: startupProbe allows under 10 minutes for model loading")
    if pod["spec"].get("securityContext", {}).get("runAsNonRoot") is not True:
        problems.append("Deployment: pods must set runAsNonRoot")
    problems += check_env_refs(container, pod["spec"], objects)
    problems += check_grace_period(pod["spec"], container)
    return problems


def check_grace_period(pod_spec: dict[str, Any], container: dict[str, Any]) -> Problems:
    """terminationGracePeriodSeconds = preStop sleep + MPO_DRAIN_TIMEOUT_S + END_OF_DRAIN_S:
    shorter, the kubelet kills streams the drain would have ended; longer, a rollout waits
    for nothing."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    drain = env.get("MPO_DRAIN_TIMEOUT_S")
    if drain is None:
        return ["Deployment: set MPO_DRAIN_TIMEOUT_S (the grace period is derived from it)"]
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    pre_stop = float(command[1]) if command and command[0] == "sleep" else 0.0
    want = pre_stop + float(drain) + END_OF_DRAIN_S
    grace = pod_spec.get("terminationGracePeriodSeconds", 30)
    if grace != want:
        return [
            f"Deployment: terminationGracePeriodSeconds is {grace}, but preStop ({pre_stop:g} s)"
            f" + MPO_DRAIN_TIMEOUT_S ({drain} s) + {END_OF_DRAIN_S} s = {want:g}"
        ]
    return []


def check_env_refs(
    container: dict[str, Any], pod_spec: dict[str, Any], objects: dict[str, dict[str, Any]]
) -> Problems:
    problems: Problems = []
    example = load_yaml(DEPLOY / "k8s" / "secret.example.yaml")
    secrets = {example["metadata"]["name"]: example}
    secrets.update({o["metadata"]["name"]: o for o in objects.values() if o["kind"] == "Secret"})
    env = {e["name"]: e for e in container.get("env", [])}
    for name in ("MPO_API_KEY", "MPO_ADMIN_TOKEN"):
        ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            problems.append(f"Deployment: {name} must come from a Secret")
            continue
        secret = secrets.get(ref["name"], {})
        keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
        if ref["key"] not in keys:
            problems.append(f"Deployment: {name} reads missing {ref['name']}/{ref['key']}")
    config_path = env.get("MPO_CONFIG", {}).get("value", "")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    volume = volumes.get(mounts.get(str(Path(config_path).parent), ""), {})
    config_map = objects.get(f"ConfigMap/{volume.get('configMap', {}).get('name')}")
    if config_map is None or Path(config_path).name not in config_map.get("data", {}):
        problems.append(f"Deployment: MPO_CONFIG={config_path} is not in a mounted ConfigMap")
    else:
        problems += check_policy_set(config_map["data"][Path(config_path).name])
    return problems


def check_policy_set(text: str) -> Problems:
    """The ConfigMap's policy set must pass the server's own config validation."""
    try:
        from mpo_core.config import parse_config
        from mpo_core.errors import ConfigError
    except ImportError as exc:
        problems = unavailable("mpo_core", exc, "policy-set ConfigMap checked as YAML only")
        if not isinstance(yaml.safe_load(text), dict):
            problems.append("policy set: not a mapping")
        return problems
    try:
        parse_config(yaml.safe_load(text))
    except ConfigError as exc:
        return [f"policy-set ConfigMap: {exc}"]
    return []


def check_routing(objects: dict[str, dict[str, Any]], pod_labels: dict[str, str]) -> Problems:
    problems: Problems = []
    service = objects.get("Service/mpo-server")
    if service is None:
        return ["no Service mpo-server"]
    if not selects(service["spec"]["selector"], pod_labels):
        problems.append("Service: selector does not match the Deployment's pods")
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for obj in objects.values():
        spec = obj.get("spec", {})
        if obj["kind"] == "PodDisruptionBudget" and not selects(
            spec["selector"]["matchLabels"], pod_labels
        ):
            problems.append("PodDisruptionBudget: selector misses the Deployment's pods")
        if obj["kind"] != "ServiceMonitor":
            continue
        if not selects(spec["selector"]["matchLabels"], service["metadata"]["labels"]):
            problems.append("ServiceMonitor: selector misses the Service")
        for endpoint in spec["endpoints"]:
            if endpoint.get("port") not in service_ports or endpoint.get("path") != "/metrics":
                problems.append("ServiceMonitor: an endpoint must scrape a Service port's /metrics")
    return problems


def check_autoscaler(objects: dict[str, dict[str, Any]]) -> Problems:
    hpa = objects.get("HorizontalPodAutoscaler/mpo-server")
    if hpa is None:
        return ["no HorizontalPodAutoscaler mpo-server"]
    problems: Problems = []
    target = hpa["spec"]["scaleTargetRef"]
    if f"{target['kind']}/{target['name']}" not in objects:
        problems.append(f"HPA: scale target {target['kind']}/{target['name']} does not exist")
    metrics = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    names = {m["pods"]["metric"]["name"] for m in metrics}
    if names != {"mpo_num_requests_waiting"}:
        problems.append(f"HPA: expected the Pods metric mpo_num_requests_waiting, got {names}")
    if any(m["pods"]["target"]["type"] != "AverageValue" for m in metrics):
        problems.append("HPA: a Pods metric target must be an AverageValue")
    return problems


def check_kubernetes(rendered: Path) -> Problems:
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    objects = index(docs)
    deploy = objects.get("Deployment/mpo-server")
    if deploy is None:
        return ["no Deployment mpo-server in the rendered kustomization"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    problems = check_workload(deploy, objects)
    problems += check_routing(objects, pod_labels)
    problems += check_autoscaler(objects)
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    listed = set(kustomization["resources"]) | {"kustomization.yaml"}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name not in listed and not path.name.endswith(".example.yaml"):
            problems.append(f"k8s/{path.name} is neither in kustomization.yaml nor an example")
    return problems


# ------------------------------------------------------- the family over several ranks

LWS_SPEC = {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
LWS_TEMPLATE = {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy"}
RANK_ENV = {  # how each pod learns its place (torch.distributed's env:// variables)
    "RANK": "$(LWS_WORKER_INDEX)",
    "WORLD_SIZE": "$(LWS_GROUP_SIZE)",
    "MASTER_ADDR": "$(LWS_LEADER_ADDRESS)",
}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def check_leaderworkerset(path: Path) -> Problems:
    """deploy/k8s-distributed: the LeaderWorkerSet's fields (a CRD the schema validator
    does not know), its size against the ranks the ConfigMap's policy set uses, the rank
    variables in both templates, and a Service that routes to leaders only."""
    objects = index([d for d in yaml.safe_load_all(path.read_text()) if d])
    lws = next((o for o in objects.values() if o["kind"] == "LeaderWorkerSet"), None)
    if lws is None:
        return [f"{path.name}: no LeaderWorkerSet"]
    problems: Problems = []
    if lws["apiVersion"] != "leaderworkerset.x-k8s.io/v1":
        problems.append(f"LeaderWorkerSet: apiVersion {lws['apiVersion']!r}")
    spec = lws["spec"]
    problems += [f"LeaderWorkerSet: unknown field spec.{k}" for k in set(spec) - LWS_SPEC]
    template = spec["leaderWorkerTemplate"]
    problems += [
        f"LeaderWorkerSet: unknown field leaderWorkerTemplate.{k}"
        for k in set(template) - LWS_TEMPLATE
    ]
    if spec.get("startupPolicy") not in (None, "LeaderCreated", "LeaderReady"):
        problems.append("LeaderWorkerSet: startupPolicy is LeaderCreated or LeaderReady")
    if template.get("restartPolicy") != "RecreateGroupOnPodRestart":
        problems.append(
            "LeaderWorkerSet: restartPolicy must be RecreateGroupOnPodRestart (a lost rank "
            "breaks the group's process group)"
        )
    volumes: dict[str, str] = {}
    for role in ("leaderTemplate", "workerTemplate"):
        pod = template[role]["spec"]
        container = pod["containers"][0]
        env = _env(container)
        for name, value in RANK_ENV.items():
            if env.get(name) != value:
                problems.append(f"{role}: env {name} must be {value}")
        volumes = {v["name"]: v.get("configMap", {}).get("name", "") for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        config = env.get("MPO_CONFIG", "")
        mounted = next((n for at, n in mounts.items() if config.startswith(at + "/")), None)
        if mounted is None or not volumes.get(mounted):
            problems.append(f"{role}: MPO_CONFIG {config!r} is not in a mounted ConfigMap")
    configmaps = [o for o in objects.values() if o["kind"] == "ConfigMap"]
    family = next((c["data"]["policies.yaml"] for c in configmaps if c["metadata"]["name"] in
                   volumes.values()), None)  # fmt: skip
    if family is None:
        return [*problems, "LeaderWorkerSet: its ConfigMap is not in the file"]
    problems += check_policy_set(family)
    try:
        from mpo_core.config import parse_config

        ranks = len(parse_config(yaml.safe_load(family)).ranks)
        if template["size"] != ranks:
            problems.append(
                f"LeaderWorkerSet: size {template['size']} but the policy set uses {ranks} ranks"
            )
    except Exception as exc:  # noqa: BLE001 - reported by check_policy_set above
        problems.append(f"policy set: {exc}")
    leader = template["leaderTemplate"]["metadata"]["labels"]
    worker = template["workerTemplate"]["metadata"]["labels"]
    services = [o for o in objects.values() if o["kind"] == "Service"]
    if not services:
        problems.append("no Service for the leaders")
    for service in services:
        selector = service["spec"]["selector"]
        if not selects(selector, leader) or selects(selector, worker):
            problems.append(f"Service/{service['metadata']['name']}: must select leaders only")
    return problems


# ---------------------------------------------------------------------------- main


def run(name: str, check: Callable[[], Problems]) -> bool:
    problems = check()
    for problem in problems:
        print(f"FAIL {name}: {problem}")
    if not problems:
        print(f"ok   {name}")
    return not problems


def _dashboard_check(path: Path, uids: set[str]) -> Callable[[], Problems]:
    return lambda: check_dashboard(path, uids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rendered", type=Path, required=True, help="kubectl kustomize output")
    args = parser.parse_args(argv)
    dashboards = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    uids = set(provisioned_datasources())
    results = [run("metric list against server/metrics.py", check_metric_list)]
    results += [run(f"dashboard {p.name}", _dashboard_check(p, uids)) for p in dashboards]
    results.append(run("compose, prometheus and grafana wiring", check_compose))
    results.append(run("kubernetes cross-references", lambda: check_kubernetes(args.rendered)))
    ranked = DEPLOY / "k8s-distributed" / "leaderworkerset.yaml"
    results.append(run("leaderworkerset (ranks)", lambda: check_leaderworkerset(ranked)))
    return 0 if dashboards and all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
