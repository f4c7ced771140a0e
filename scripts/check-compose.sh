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
#
# Needs no Docker daemon. When docker-compose is missing it is installed with
# apt-get if this runs as root (as CI does); otherwise the script stops and
# says what to install.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPOSE_FILE="$ROOT/docker-compose.yml"
CLUSTER_FILE="$ROOT/docker-compose.cluster.yml"
NOT_SERVICES="cli common"

fail() {
    printf 'check-compose: FAIL: %s\n' "$*" >&2
    exit 1
}

ensure_docker_compose() {
    if command -v docker-compose >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        fail "docker-compose is not installed. Install Debian's package as root: apt-get install -y docker-compose"
    fi
    command -v apt-get >/dev/null 2>&1 \
        || fail "docker-compose is not installed and apt-get is not available to install it"
    echo "check-compose: installing docker-compose with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends docker-compose >/dev/null; then
        apt-get update >/dev/null \
            && apt-get install -y --no-install-recommends docker-compose >/dev/null \
            || fail "apt-get install -y docker-compose failed"
    fi
    command -v docker-compose >/dev/null 2>&1 \
        || fail "docker-compose is still not on PATH after apt-get install"
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
echo "check-compose: ok"
