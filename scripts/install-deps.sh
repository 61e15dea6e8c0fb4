#!/usr/bin/env bash
# Installs everything vhost-relay's demo and tests need on a fresh Debian 12 machine.
# QEMU must come from bookworm-backports: bookworm's 7.2 segfaults under TCG as soon as a
# guest starts a vhost-user virtio-net device.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need_backports=1
if command -v qemu-system-x86_64 >/dev/null 2>&1 &&
   qemu-system-x86_64 --version | grep -Eq 'version (1[0-9]|[89])\.'; then
  need_backports=0
fi

# Backports is needed even when QEMU 10 is already there: the vDPA tests' guest kernel (6.12 with
# vdpa, vhost_vdpa and VDUSE) is fetched from it with `apt-get download`.
added_backports=0
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  added_backports=1
  # Derive the backports source from the machine's own Debian source, so no mirror address
  # is written here: keep the first stanza (main archive) and add the backports suite.
  src=/etc/apt/sources.list.d/debian.sources
  if [ -f "$src" ]; then
    awk 'BEGIN{RS="";ORS="\n\n"} NR==1' "$src" |
      sed -E 's/^Suites:.*/Suites: bookworm-backports/' >/etc/apt/sources.list.d/backports.sources
  else
    mirror=$(awk '/^deb / && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
    echo "deb $mirror bookworm-backports main" >/etc/apt/sources.list.d/backports.list
  fi
fi

pkgs=(busybox-static cpio xz-utils iproute2 iputils-ping dpdk dpdk-dev python3 socat procps
      libvirt-daemon-system libvirt-clients libxml2-utils ethtool
      # The metrics tests scrape /metrics with a real HTTP client and validate the exposition
      # with Prometheus' own checker (`promtool check metrics`, in the prometheus package).
      curl prometheus

      # The Debian package (scripts/build-deb.sh, test-deb.sh): dpkg-shlibdeps, man -l, and
      # systemd-analyze verify for the units.
      dpkg-dev man-db systemd
      # tests/packaging.rs: the system calls of a serving port, against the unit's filter.
      strace)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "$need_backports" = 1 ] || [ "$added_backports" = 1 ] || [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
fi
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ "$need_backports" = 1 ]; then
  apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86
fi
qemu-system-x86_64 --version | head -n1
