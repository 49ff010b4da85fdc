#!/usr/bin/env bash
# Installs the given Debian packages (apt-get update first; through sudo unless root).
set -euo pipefail
sudo=""
[[ $(id -u) == 0 ]] || sudo=sudo
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "$@"
