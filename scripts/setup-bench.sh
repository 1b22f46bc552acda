#!/usr/bin/env bash
# Installs what `make bench` needs beyond scripts/setup-system.sh, only if missing: stress-ng
# (part 4b keeps every core busy with it while the gateway records at the unit's Nice=-5).
# Not a dependency of the box or of the tests.
set -euo pipefail
packages=(stress-ng)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "installing Debian packages for the bench: ${missing[*]}"
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
