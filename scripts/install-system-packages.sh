#!/usr/bin/env bash
# Install the Debian packages the tests use as real outside clients, when they are missing:
# kcat (a non-Python Kafka client), docker-compose (validates docker-compose.yml), chromium
# (the reviewer page's browser test) and prometheus (a real server scrapes the stack; promtool checks
# every /metrics and the compose stack's Prometheus config). Installs only as root; otherwise says
# what is missing.
set -euo pipefail

declare -A PACKAGE_OF=([kcat]=kcat [docker-compose]=docker-compose [chromium]=chromium [prometheus]=prometheus
    [promtool]=prometheus)
missing=()
for command in "${!PACKAGE_OF[@]}"; do
    command -v "$command" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$command]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    printf 'missing Debian packages: %s (install them as root: apt-get install -y %s)\n' \
        "${missing[*]}" "${missing[*]}" >&2
    exit 1
fi
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
fi
