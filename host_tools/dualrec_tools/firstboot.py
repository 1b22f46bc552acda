"""What `dualrec-tool image` puts on the boot partition to turn a stock Raspberry Pi OS Lite
card into a recording box on its first boot, with no shell session on the Pi.

One script does the work on both releases (FIRSTBOOT_SH, as /boot/firmware/dualrec/firstboot.sh);
only the hook that runs it differs:

- Bookworm: the mechanism Raspberry Pi Imager uses there, ``systemd.run=/boot/firmware/
  firstrun.sh systemd.run_success_action=reboot systemd.unit=kernel-command-line.target``
  appended to cmdline.txt; firstrun.sh removes those words and itself, and the Pi reboots into
  the normal system with the gateway enabled.
- Trixie: cloud-init's NoCloud files on the boot partition (user-data, meta-data,
  network-config), as Imager writes them for Trixie; ``runcmd`` runs the script, then starts the
  gateway.

The script logs to dualrec/firstboot.log on the FAT partition, so a card taken out of a box that
did not come up can be read on any laptop. It deletes the provisioning bundle (keys!) from the
FAT partition once copied into /etc/dualrec.
"""

from __future__ import annotations

import secrets

BOOT = "/boot/firmware"  # where Bookworm and Trixie mount the FAT partition
CMDLINE_WORDS = (f"systemd.run={BOOT}/firstrun.sh", "systemd.run_success_action=reboot",
                 "systemd.unit=kernel-command-line.target")

FIRSTBOOT_SH = """#!/bin/sh
# dualrec first boot (written by dualrec-tool image): install the package offline, move the
# provisioning bundle into /etc/dualrec, enable the gateway. Logs next to itself (FAT partition).
set -u
DIR=$(dirname "$(readlink -f "$0")")
exec >>"$DIR/firstboot.log" 2>&1
echo "== dualrec first boot $(date -u +%Y-%m-%dT%H:%M:%SZ) =="
set -ex
BOARD=$(cat "$DIR/board")
DEB=$(ls "$DIR"/dualrec_*.deb | head -n 1)
# Offline first: the package's own Python dependencies are inside it, and its Debian ones
# (python3-venv, python3-numpy, ...) are in Raspberry Pi OS, so dpkg alone installs it (and
# leaves out the Recommends the image lacks, python3-pyaudio on Lite, which apt would try to
# download; apt-get --no-download cannot install a local .deb: "Pathname to install is not
# absolute"). Only if a dependency is missing, and the box has network, does apt fetch it.
if ! dpkg -i "$DEB"; then
    apt-get update && apt-get install -y -f
fi
install -d -m 0750 -o root -g dualrec /etc/dualrec
if [ -d "$DIR/bundle" ]; then
    cp -R "$DIR/bundle/." /etc/dualrec/
    chown -R root:dualrec /etc/dualrec
    find /etc/dualrec -type d -exec chmod 0750 {} +
    find /etc/dualrec -type f ! -path '/etc/dualrec/boards/*' -exec chmod 0640 {} +
    rm -rf "$DIR/bundle"  # private keys do not stay on a FAT partition anyone can read
fi
[ -e /etc/dualrec/board.toml ] || cp "/etc/dualrec/boards/$BOARD.toml" /etc/dualrec/board.toml
if [ -d /etc/chrony/conf.d ]; then
    NTP=$(cat "$DIR/ntp-server" 2>/dev/null || true)
    /opt/dualrec/venv/bin/dualrec chrony-conf --board /etc/dualrec/board.toml --server "$NTP" \\
        > /etc/chrony/conf.d/dualrec.conf
fi
systemctl enable dualrec.service
# keys are made on the box: enroll with the bundle's single-use token (retried until the
# receiver answers; dualrec-enroll.service restarts the gateway once enrolled)
[ -e /etc/dualrec/enroll.json ] && systemctl enable dualrec-enroll.service
rm -f "$DEB"
runuser -u dualrec -- /opt/dualrec/venv/bin/dualrec check-config \\
    --board /etc/dualrec/board.toml --site /etc/dualrec/site.toml || true
date -u +%Y-%m-%dT%H:%M:%SZ > "$DIR/firstboot.done"
"""

FIRSTRUN_SH = f"""#!/bin/bash
# Bookworm's first-boot hook (the Raspberry Pi Imager mechanism): run once from the kernel
# command line, then take itself out of it; systemd reboots into the normal system afterwards.
set +e
sh {BOOT}/dualrec/firstboot.sh
rm -f {BOOT}/firstrun.sh
sed -i 's| systemd.run.*||g' {BOOT}/cmdline.txt
exit 0
"""


def cmdline_with_hook(cmdline: str) -> str:
    """cmdline.txt (one line) with the firstrun words appended, any earlier hook replaced."""
    words = [w for w in cmdline.split()
             if not w.startswith(("systemd.run=", "systemd.run_success_action=",
                                  "systemd.unit="))]
    return " ".join([*words, *CMDLINE_WORDS]) + "\n"


def user_data(hostname: str | None) -> str:
    lines = ["#cloud-config",
             "# written by dualrec-tool image: install dualrec offline on the first boot",
             "runcmd:",
             f"  - [sh, {BOOT}/dualrec/firstboot.sh]",
             "  - [systemctl, start, --no-block, dualrec.service]"]
    if hostname:
        lines[2:2] = [f"hostname: {hostname}", "manage_etc_hosts: true"]
    return "\n".join(lines) + "\n"


def meta_data(hostname: str | None) -> str:
    # A new instance-id per image: cloud-init runs its per-instance modules once per id.
    lines = [f"instance-id: dualrec-{secrets.token_hex(8)}"]
    if hostname:
        lines.append(f"local-hostname: {hostname}")
    return "\n".join(lines) + "\n"


NETWORK_CONFIG = """# written by dualrec-tool image: wired Ethernet by DHCP (the uplink)
network:
  version: 2
  ethernets:
    eth0:
      dhcp4: true
      optional: true
"""
