#!/usr/bin/env bash
# Installs the Debian packages dualrec needs, only those missing: ffmpeg/ffprobe (interop checks),
# age (the reference decrypter), PortAudio headers (pyaudio builds against them), ALSA tools,
# chrony (the tests start each board's chrony fragment in Debian's real chronyd), systemd
# (systemd-analyze verifies the service unit), and for the box's package, image and flash tests:
# lintian (checks the .deb), python3-venv and python3-numpy (the package's offline install runs
# on Debian's python3), mtools and dosfstools (the FAT boot partition, no mount), fdisk (sfdisk
# writes the synthetic image's partition table), e2fsprogs (mkfs.ext4 -d), bmap-tools (the
# image's block map; also a second, independent writer the tests compare with).
set -euo pipefail
packages=(ffmpeg age portaudio19-dev alsa-utils libasound2-plugins chrony systemd
          lintian python3-venv python3-numpy mtools dosfstools fdisk e2fsprogs bmap-tools)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
