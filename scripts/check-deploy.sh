#!/usr/bin/env bash
# Checks the deployment files offline, as CI does (.ci/run):
#   - deploy/k8s: every kustomization renders (`kubectl kustomize`), and what
#     it renders validates against Kubernetes' own schemas in strict mode
#     (kubernetes-validate: an unknown or misspelt field fails), plus what
#     schemas cannot say: requests and limits on every container, probes and
#     a metrics port on corral's, references to ConfigMaps and Secrets that
#     exist, stream replicas that the NATS cluster can hold;
#   - the NATS configurations the overlays render (`nats-server -t`);
#   - docker-compose.yml (`docker-compose config`);
#   - deploy/grafana: every dashboard is valid JSON, and every corral_ metric
#     its queries name is in the Rust sources (services/, crates/, cli/).
# What is missing is installed: kubectl (Debian's kubernetes-client),
# docker-compose and nats-server with apt, kubernetes-validate with pip into
# a virtualenv under the cache directory. After that, no network is needed.
#
#   bash scripts/check-deploy.sh
#   KUBECTL=/path/to/kubectl bash scripts/check-deploy.sh   # another kubectl
set -euo pipefail
cd "$(dirname "$0")/.."

# The oldest Kubernetes the manifests must suit (autoscaling/v2, policy/v1).
K8S_VERSION=1.29.0
VALIDATE_PIN=kubernetes-validate==1.37.0
CACHE=${CORRAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/corral}
VENV=$CACHE/k8s-venv
KUBECTL=${KUBECTL:-kubectl}

say() { printf '==> %s\n' "$*"; }
fail() {
  printf 'check-deploy: FAILED: %s\n' "$*" >&2
  exit 1
}

apt_updated=
apt_install() {
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || fail "cannot install $* (apt): not root and no sudo"
    sudo=(sudo)
  fi
  if [ -z "$apt_updated" ]; then
    "${sudo[@]}" apt-get update -qq
    apt_updated=1
  fi
  say "installing $* (apt)"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---- tools ----
if ! command -v "$KUBECTL" >/dev/null; then
  [ "$KUBECTL" = kubectl ] || fail "KUBECTL=$KUBECTL not found"
  apt_install kubernetes-client
fi
command -v docker-compose >/dev/null || apt_install docker-compose
# Debian puts it in /usr/sbin, off a user's PATH (as scripts/services.sh).
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server
NATS_SERVER=$(command -v nats-server || echo /usr/sbin/nats-server)
command -v python3 >/dev/null || apt_install python3 python3-venv
if ! "$VENV/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
  # Debian's python3 has no venv (ensurepip) without python3-venv.
  python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
  say "installing $VALIDATE_PIN into $VENV (pip)"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$VALIDATE_PIN"
fi
say "kubectl: $("$KUBECTL" version --client 2>/dev/null | head -n 1)"
say "kubernetes-validate $("$VENV/bin/python" -c 'import kubernetes_validate.version as v; print(v.__version__)'), schemas of Kubernetes $K8S_VERSION (strict)"
say "docker-compose $(docker-compose version --short 2>/dev/null), $("$NATS_SERVER" --version)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---- grafana ----
# Every dashboard is JSON, and every corral_ metric its queries (`expr`)
# name is one the Rust sources emit (a summary's _sum and _count, a
# histogram's _bucket, count as their metric's name).
python3 - <<'PY'
import glob, json, os, re, sys

SOURCES = ["services", "crates", "cli"]
dashboards = sorted(glob.glob("deploy/grafana/*.json"))
if not dashboards:
    sys.exit("check-deploy: FAILED: no dashboard in deploy/grafana/*.json")

text = []
for top in SOURCES:
    for here, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d != "target"]
        text += [open(os.path.join(here, f), encoding="utf-8", errors="replace").read()
                 for f in files if f.endswith(".rs")]
text = "\n".join(text)


def emitted(name):
    if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text):
        return True
    base = re.sub(r"_(sum|count|bucket)$", "", name)
    return base != name and emitted(base)


def panels(items):
    for panel in items or []:
        yield panel
        yield from panels(panel.get("panels"))


errors = []
for path in dashboards:
    try:
        dashboard = json.load(open(path, encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        sys.exit(f"check-deploy: FAILED: {path} is not valid JSON: {err}")
    for key in ("uid", "title", "schemaVersion", "panels"):
        if key not in dashboard:
            errors.append(f"{path}: no {key!r}")
    ids = [p.get("id") for p in panels(dashboard.get("panels"))]
    for dup in sorted({i for i in ids if ids.count(i) > 1}, key=str):
        errors.append(f"{path}: panel id {dup} is used more than once")
    exprs = 0
    for panel in panels(dashboard.get("panels")):
        for target in panel.get("targets") or []:
            expr = target.get("expr")
            if not expr:
                continue
            exprs += 1
            for name in sorted(set(re.findall(r"(?<![A-Za-z0-9_:])corral_[A-Za-z0-9_]+", expr))):
                if not emitted(name):
                    errors.append(
                        f'{path}: panel "{panel.get("title")}" queries {name}, which no Rust '
                        f"source under {'/, '.join(SOURCES)}/ names (misspelt, renamed or removed?)"
                    )
    print(f"==> {path}: valid JSON, {exprs} queries")

for error in dict.fromkeys(errors):
    print(f"  {error}", file=sys.stderr)
if errors:
    sys.exit(f"check-deploy: FAILED: {len(dict.fromkeys(errors))} problem(s) in deploy/grafana")
print("==> every corral_ metric the dashboards query is in the Rust sources")
PY

# ---- render ----
# A copy without any overlay's secrets/ (real secrets never leave it), where
# every file a secretGenerator names is a placeholder.
mkdir -p "$work/k8s" "$work/rendered"
tar -C deploy/k8s --exclude='./overlays/*/secrets' -cf - . | tar -C "$work/k8s" -xf -
"$VENV/bin/python" - "$work/k8s" <<'PY'
import glob, os, sys
import yaml

root = sys.argv[1]
for kustomization in sorted(glob.glob(os.path.join(root, "**", "kustomization.yaml"), recursive=True)):
    here = os.path.dirname(kustomization)
    spec = yaml.safe_load(open(kustomization)) or {}
    for generator in spec.get("secretGenerator") or []:
        files = [entry.split("=", 1)[-1] for entry in generator.get("files") or []]
        envs = ([generator["env"]] if generator.get("env") else []) + (generator.get("envs") or [])
        for path, text in [(f, "placeholder: not a secret\n") for f in files] + [
            (e, "PLACEHOLDER=not-a-secret\n") for e in envs
        ]:
            target = os.path.join(here, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as out:
                out.write(text)
PY

targets=()
while IFS= read -r file; do
  targets+=("$(dirname "${file#"$work/k8s/"}")")
done < <(find "$work/k8s" -name kustomization.yaml | sort)
[ "${#targets[@]}" -gt 0 ] || fail "no kustomization.yaml under deploy/k8s"
for target in "${targets[@]}"; do
  out="$work/rendered/${target//\//_}.yaml"
  if ! "$KUBECTL" kustomize "$work/k8s/$target" >"$out" 2>"$work/stderr"; then
    cat "$work/stderr" >&2
    fail "kubectl kustomize deploy/k8s/$target"
  fi
  # Deprecation notices of newer kustomize (bases, commonLabels, ...) are
  # expected: the files also suit kubectl 1.20's kustomize.
  grep -v 'is deprecated' "$work/stderr" >&2 || true
  say "rendered deploy/k8s/$target: $(grep -c '^kind:' "$out") objects"
done

# ---- validate ----
"$VENV/bin/python" - "$K8S_VERSION" "$work/rendered" <<'PY'
import glob, os, sys
import yaml
from kubernetes_validate import utils

version, rendered = sys.argv[1], sys.argv[2]
NAMESPACE = "corral"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
STREAMS = ["COMMANDS", "LIFECYCLE", "EVENTS", "DEAD_LETTERS"]
errors = []
checked = 0


def pod_spec(obj):
    spec = obj.get("spec") or {}
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return (spec.get("template") or {}).get("spec") or {}


def references(spec):
    """(kind, name) of every ConfigMap and Secret a pod spec names."""
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                yield "ConfigMap", source["configMapRef"]["name"]
            if "secretRef" in source:
                yield "Secret", source["secretRef"]["name"]
        for env in container.get("env") or []:
            ref = env.get("valueFrom") or {}
            if "configMapKeyRef" in ref:
                yield "ConfigMap", ref["configMapKeyRef"]["name"]
            if "secretKeyRef" in ref:
                yield "Secret", ref["secretKeyRef"]["name"]
    for volume in spec.get("volumes") or []:
        sources = [volume] + ((volume.get("projected") or {}).get("sources") or [])
        for source in sources:
            if "configMap" in source:
                yield "ConfigMap", source["configMap"]["name"]
            if "secret" in source:
                secret = source["secret"]
                yield "Secret", secret.get("secretName") or secret.get("name")


for path in sorted(glob.glob(os.path.join(rendered, "*.yaml"))):
    target = os.path.basename(path)[: -len(".yaml")].replace("_", "/")
    where = f"deploy/k8s/{target}"
    objects = [o for o in yaml.safe_load_all(open(path)) if o]
    # The overlays generate the Secrets; what they build on names them only.
    complete = target.startswith("overlays/")
    present = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for obj in objects:
        name = f'{obj.get("kind")}/{obj.get("metadata", {}).get("name")}'
        checked += 1
        try:
            utils.validate(obj, version, strict=True)
        except utils.ValidationError as err:
            field = ".".join(str(p) for p in err.path)
            errors.append(f"{where}: {name}: {field}: {err.message}")
        except (utils.SchemaNotFoundError, utils.InvalidSchemaError) as err:
            errors.append(f"{where}: {name}: {err.message}")
        if obj["kind"] not in CLUSTER_SCOPED and obj["metadata"].get("namespace") != NAMESPACE:
            errors.append(f"{where}: {name}: not in namespace {NAMESPACE}")
        if obj["kind"] not in WORKLOADS:
            continue
        spec = pod_spec(obj)
        for ref in sorted(set(references(spec))):
            if ref not in present and (complete or ref[0] == "ConfigMap"):
                errors.append(f"{where}: {name} names {ref[0]} {ref[1]}, which is not rendered")
        for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
            cname = f'{name} container {container["name"]}'
            resources = container.get("resources") or {}
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in (resources.get(kind) or {}):
                        errors.append(f"{where}: {cname}: no {resource} in resources.{kind}")
            if "corral" not in container.get("image", "") or container in (spec.get("initContainers") or []):
                continue
            ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
            if not any(n and n.endswith("metrics") for n in ports):
                errors.append(f"{where}: {cname}: no metrics port")
            for probe, route in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                got = ((container.get(probe) or {}).get("httpGet") or {}).get("path")
                if got != route:
                    errors.append(f"{where}: {cname}: {probe} is not GET {route} (got {got})")
    # Each stream keeps as many copies as there are NATS servers.
    env = {}
    for obj in objects:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("corral-env"):
            env = obj.get("data") or {}
    servers = [o["spec"].get("replicas", 1) for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "nats"]
    for stream in STREAMS:
        key = f"CORRAL_STREAMS__{stream}__REPLICAS"
        if servers and env.get(key) != str(servers[0]):
            errors.append(f"{where}: corral-env {key}={env.get(key)} but NATS has {servers[0]} server(s)")

for error in errors:
    print(f"  {error}", file=sys.stderr)
if errors:
    sys.exit(f"check-deploy: FAILED: {len(errors)} problem(s) in the rendered manifests")
print(f"==> validated {checked} objects against Kubernetes {version} (strict), with corral's own checks")
PY

# ---- NATS ----
# Each overlay's server configuration, with a stand-in for the users file
# that `corral keys init` writes.
for out in "$work"/rendered/overlays_*.yaml; do
  overlay=$(basename "$out" .yaml)
  overlay=${overlay#overlays_}
  mkdir -p "$work/nats/$overlay"
  "$VENV/bin/python" - "$out" "$work/nats/$overlay" <<'PY'
import os, sys
import yaml

rendered, into = sys.argv[1], sys.argv[2]
for obj in yaml.safe_load_all(open(rendered)):
    if obj and obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("nats-config"):
        for name, text in obj["data"].items():
            with open(os.path.join(into, name), "w") as out:
                out.write(text)
with open(os.path.join(into, "auth.conf"), "w") as out:
    out.write('authorization { users = [ { nkey: "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4" } ] }\n')
PY
  [ -f "$work/nats/$overlay/nats.conf" ] || fail "overlays/$overlay renders no nats-config with nats.conf"
  if ! (cd "$work/nats/$overlay" && POD_NAME=nats-0 "$NATS_SERVER" -t -c nats.conf >"$work/stderr" 2>&1); then
    cat "$work/stderr" >&2
    fail "nats-server -t: the NATS configuration of overlays/$overlay"
  fi
  say "nats-server -t: the NATS configuration of overlays/$overlay is valid"
done

# ---- compose ----
docker-compose -f docker-compose.yml config -q || fail "docker-compose config: docker-compose.yml"
say "docker-compose config: docker-compose.yml is valid"
say "deploy checks passed"
