#!/usr/bin/env bash
# Installs the Debian packages dualrec needs, only those missing: ffmpeg/ffprobe (interop checks),
# age (the reference decrypter), PortAudio headers (pyaudio builds against them), ALSA tools,
# chrony (the tests start each board's chrony fragment in Debian's real chronyd), systemd
# (systemd-analyze verifies the service unit), and for the box's package, image and flash tests:
# lintian (checks the .deb), python3-venv and python3-numpy (the package's offline install runs
# on Debian's python3), mtools and dosfstools (the FAT boot partition, no mount), fdisk (sfdisk
# writes the synthetic image's partition table), e2fsprogs (mkfs.ext4 -d), bmap-tools (the
# image's block map; also a second, independent writer the tests compare with), prometheus
# (promtool checks the receiver's alert rules; Debian ships promtool only in this package),
# chromium and chromium-driver (the web pages' tests drive Debian's headless Chromium through
# its chromedriver), fonts-dejavu-core (the font dualrec-web burns its watermark in with) and
# fonts-wqy-microhei (Chinese in the operation log, so the tests' screenshots can be read).
set -euo pipefail
packages=(ffmpeg age portaudio19-dev alsa-utils libasound2-plugins chrony systemd
          lintian python3-venv python3-numpy mtools dosfstools fdisk e2fsprogs bmap-tools
          prometheus chromium chromium-driver fonts-dejavu-core
          fonts-wqy-microhei)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# cloud-init's schema (tests/test_image.py validates the image's user-data against it): taken
# out of Debian's cloud-init package, not installed, since an installed cloud-init would run at
# this machine's next boot.
schema_dir=build/cloud-init
if [ ! -e "$schema_dir/schema-cloud-config-v1.json" ]; then
  tmp=$(mktemp -d)
  chmod 0755 "$tmp"  # apt-get download works as the _apt user
  (cd "$tmp" && apt-get download -qq cloud-init 2>/dev/null \
     || { $sudo apt-get update -qq && apt-get download -qq cloud-init; })
  dpkg-deb -x "$tmp"/cloud-init_*.deb "$tmp/x"
  mkdir -p "$schema_dir"
  cp "$tmp"/x/usr/lib/python3/dist-packages/cloudinit/config/schemas/*.json "$schema_dir/"
  rm -rf "$tmp"
fi
