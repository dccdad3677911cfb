#!/usr/bin/env bash
# Installs the Debian packages of the given commands when they are missing, so `make run`
# and `make test` work on a fresh machine: redis-server (the job queue) and prometheus (the
# dashboards test). Each command's package has the command's name.
set -euo pipefail
missing=()
for command in "$@"; do
    command -v "$command" >/dev/null 2>&1 || missing+=("$command")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing ${missing[*]} (Debian packages)"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
