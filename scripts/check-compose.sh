#!/usr/bin/env bash
# Validate docker-compose.yml (alone and with docker-compose.cluster.yml) and check that it runs every
# service module.
#
#   bash scripts/check-compose.sh
#
# 1. `docker-compose config -q` (Debian's docker-compose, the v1 tool) must
#    accept the file, without warnings such as unset variables.
# 2. Every package services/<name>/ with a __main__.py must be run by some
#    compose service (`command: python -m services.<name>`), so the stack
#    cannot silently fall behind the code. services/cli and services/common
#    are libraries, not services.
# 3. `promtool check config` accepts deploy/prometheus/prometheus.yml, which must
#    scrape every service that runs a module on its health port; the prometheus
#    and grafana services mount their files; the dashboard JSON parses and each
#    panel queries the provisioned data source (tests/test_compose.py checks
#    that every metric a panel names exists).
#
# Needs no Docker daemon. When docker-compose or promtool is missing it is
# installed with apt-get if this runs as root (as CI does); otherwise the
# script stops and says what to install.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPOSE_FILE="$ROOT/docker-compose.yml"
CLUSTER_FILE="$ROOT/docker-compose.cluster.yml"
PROMETHEUS_CONFIG="$ROOT/deploy/prometheus/prometheus.yml"
GRAFANA_DIR="$ROOT/deploy/grafana"
NOT_SERVICES="cli common"

fail() {
    printf 'check-compose: FAIL: %s\n' "$*" >&2
    exit 1
}

# ensure_command COMMAND PACKAGE: install Debian's PACKAGE when COMMAND is missing (as root only).
ensure_command() {
    local command="$1" package="$2"
    if command -v "$command" >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        fail "$command is not installed. Install Debian's package as root: apt-get install -y $package"
    fi
    command -v apt-get >/dev/null 2>&1 \
        || fail "$command is not installed and apt-get is not available to install it"
    echo "check-compose: installing $package with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "$package" >/dev/null; then
        apt-get update >/dev/null \
            && apt-get install -y --no-install-recommends "$package" >/dev/null \
            || fail "apt-get install -y $package failed"
    fi
    command -v "$command" >/dev/null 2>&1 \
        || fail "$command is still not on PATH after apt-get install $package"
}

ensure_docker_compose() {
    ensure_command docker-compose docker-compose
}

pick_python() {
    # Any python with PyYAML: the project's venv, or Debian's python3, which
    # gets python3-yaml as a dependency of docker-compose.
    local candidate
    for candidate in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
        [ -n "$candidate" ] || continue
        if "$candidate" -c 'import yaml' >/dev/null 2>&1; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    fail "no python with PyYAML found (set PYTHON=/path/to/python)"
}

[ -f "$COMPOSE_FILE" ] || fail "$COMPOSE_FILE not found"
ensure_docker_compose
echo "check-compose: $(docker-compose version --short 2>/dev/null || docker-compose version | head -n 1)"

stderr_file="$(mktemp)"
config_file="$(mktemp)"
trap 'rm -f "$stderr_file" "$config_file"' EXIT

# 1. The file is valid for docker-compose, with no warnings.
if ! PYTHONWARNINGS=ignore docker-compose --project-directory "$ROOT" -f "$COMPOSE_FILE" config -q 2>"$stderr_file"; then
    cat "$stderr_file" >&2
    fail "docker-compose rejected $COMPOSE_FILE (see the error above)"
fi
# Compose's own warnings (an unset variable, an ignored key) go to stderr
# with no fixed prefix, so anything there fails the check. PYTHONWARNINGS keeps
# the tool's Python libraries from adding deprecation noise.
if [ -s "$stderr_file" ]; then
    cat "$stderr_file" >&2
    fail "docker-compose warned about $COMPOSE_FILE (see above); fix the file, or give the variable a default"
fi
echo "check-compose: docker-compose config: ok"

# 1b. The three-node cluster override, merged onto it, is valid too and warns about nothing.
if ! PYTHONWARNINGS=ignore docker-compose --project-directory "$ROOT" -f "$COMPOSE_FILE" -f "$CLUSTER_FILE" \
        config -q 2>"$stderr_file" || [ -s "$stderr_file" ]; then
    cat "$stderr_file" >&2
    fail "docker-compose rejected or warned about $CLUSTER_FILE merged onto $COMPOSE_FILE (see above)"
fi
echo "check-compose: docker-compose config with the cluster override: ok"

# 2. Every service module has a compose service running it.
python_bin="$(pick_python)"
PYTHONWARNINGS=ignore docker-compose --project-directory "$ROOT" -f "$COMPOSE_FILE" config >"$config_file" 2>/dev/null \
    || fail "docker-compose config failed"
drift_check="$(cat <<'PY'
import shlex
import sys
from pathlib import Path

import yaml

config = yaml.safe_load(Path(sys.argv[1]).read_text())
services_dir = Path(sys.argv[2])
not_services = set(sys.argv[3].split())

modules = sorted(
    path.parent.name
    for path in services_dir.glob("*/__main__.py")
    if path.parent.name not in not_services
)

run = {}
for name, service in (config.get("services") or {}).items():
    command = service.get("command") or []
    if isinstance(command, str):
        command = shlex.split(command)
    for index, word in enumerate(command[:-1]):
        if word == "-m" and command[index + 1].startswith("services."):
            run[command[index + 1].split(".")[1]] = name

missing = [module for module in modules if module not in run]
if missing:
    for module in missing:
        print(
            f"check-compose: services/{module}/__main__.py exists but no compose service runs "
            f"`python -m services.{module}`; add one to docker-compose.yml",
            file=sys.stderr,
        )
    sys.exit(1)
for module in modules:
    print(f"check-compose: services.{module} -> compose service {run[module]!r}")
print(f"check-compose: service modules covered: {len(modules)}")
PY
)"
"$python_bin" -c "$drift_check" "$config_file" "$ROOT/services" "$NOT_SERVICES" \
    || fail "docker-compose.yml does not run every service module (see above)"

# 3. Prometheus and Grafana: a valid config scraping every service, their files mounted, the dashboard sound.
ensure_command promtool prometheus
promtool check config "$PROMETHEUS_CONFIG" >"$stderr_file" 2>&1 || {
    cat "$stderr_file" >&2
    fail "promtool rejected $PROMETHEUS_CONFIG (see above)"
}
echo "check-compose: promtool check config: ok"
observability_check="$(cat <<'PY'
import json
import shlex
import sys
from pathlib import Path

import yaml

config = yaml.safe_load(Path(sys.argv[1]).read_text())
prometheus = yaml.safe_load(Path(sys.argv[2]).read_text())
grafana_dir = Path(sys.argv[3])
services = config.get("services") or {}
problems = []


def command_words(service):
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def environment(service):
    found = service.get("environment") or {}
    if isinstance(found, list):
        return dict(item.split("=", 1) for item in found)
    return {str(key): str(value) for key, value in found.items()}


targets = {
    str(target)
    for job in prometheus.get("scrape_configs") or []
    for static in job.get("static_configs") or []
    for target in static.get("targets") or []
}
for name, service in services.items():
    words = command_words(service)
    runs_module = any(a == "-m" and b.startswith("services.") for a, b in zip(words, words[1:]))
    if not runs_module:
        continue
    port = environment(service).get("CHOREO_HEALTH_PORT")
    if f"{name}:{port}" not in targets:
        problems.append(f"deploy/prometheus/prometheus.yml does not scrape {name}:{port} (its health port)")
    if environment(service).get("CHOREO_HEALTH_HOST") != "0.0.0.0":
        problems.append(f"{name}: CHOREO_HEALTH_HOST must be 0.0.0.0, or Prometheus cannot reach its /metrics")


def mounts(service):
    return [str(volume) for volume in service.get("volumes") or []]


prom = services.get("prometheus")
if prom is None or not str(prom.get("image", "")).startswith("prom/prometheus:"):
    problems.append("no prometheus service running the prom/prometheus image")
elif not any(m.endswith("deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro") for m in mounts(prom)):
    problems.append("the prometheus service does not mount deploy/prometheus/prometheus.yml")
graf = services.get("grafana")
if graf is None or not str(graf.get("image", "")).startswith("grafana/grafana:"):
    problems.append("no grafana service running the grafana/grafana image")
elif not any(m.endswith("deploy/grafana/provisioning:/etc/grafana/provisioning:ro") for m in mounts(graf)):
    problems.append("the grafana service does not mount deploy/grafana/provisioning")

sources = yaml.safe_load((grafana_dir / "provisioning/datasources/prometheus.yml").read_text())
uids = {source["uid"] for source in sources["datasources"]}
dashboards = sorted((grafana_dir / "dashboards").glob("*.json"))
if not dashboards:
    problems.append("no dashboard JSON under deploy/grafana/dashboards")
for path in dashboards:
    dashboard = json.loads(path.read_text())
    panels = dashboard.get("panels") or []
    if not panels:
        problems.append(f"{path.name}: no panels")
    for panel in panels:
        title = panel.get("title", "?")
        queries = [target.get("expr", "") for target in panel.get("targets") or []]
        if not queries or not all(query.strip() for query in queries):
            problems.append(f"{path.name}: panel {title!r} has no query, or an empty one")
        if panel.get("datasource", {}).get("uid") not in uids:
            problems.append(f"{path.name}: panel {title!r} does not use a provisioned data source ({sorted(uids)})")
    print(f"check-compose: {path.name}: {len(panels)} panels")
for problem in problems:
    print(f"check-compose: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
)"
"$python_bin" -c "$observability_check" "$config_file" "$PROMETHEUS_CONFIG" "$GRAFANA_DIR" \
    || fail "Prometheus or Grafana do not cover the stack (see above)"
echo "check-compose: ok"
