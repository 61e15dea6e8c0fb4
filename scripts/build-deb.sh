#!/usr/bin/env bash
# Builds the Debian package target/debian/vhost-relay_VERSION_ARCH.deb from this tree, with
# dpkg-deb from a staged tree (Debian's own tools only: dpkg-dev for the shared-library
# dependencies). Contents: the release binary (stripped), the systemd units, QEMU's vhost-user
# descriptor naming /usr/bin/vhost-relay, the example config (a conffile), the man page
# rendered from the clap definition, and the copyright file. Prints the package's path.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

for tool in cargo dpkg-deb dpkg-shlibdeps strip gzip python3; do
  command -v "$tool" >/dev/null || {
    echo "build-deb.sh: $tool is missing (scripts/install-deps.sh installs it)" >&2
    exit 1
  }
done

target_dir=${CARGO_TARGET_DIR:-$root/target}
pkg=backend/packaging
out=$target_dir/debian
stage=$out/stage
# Debian orders 1.0~rc1 before 1.0, as Cargo orders 1.0-rc1.
version=$(cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "vhost-relay"))' |
  tr - '~')
arch=$(dpkg --print-architecture)
deb=$out/vhost-relay_${version}_${arch}.deb

cargo build --release --locked -p vhost-relay
rm -rf "$stage"
install -D -m 0755 "$target_dir/release/vhost-relay" "$stage/usr/bin/vhost-relay"
# As Debian's dh_strip does: no debug info, symbol tables or build notes.
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage/usr/bin/vhost-relay"

for unit in vhost-relay.service vhost-relay@.service vhost-relay@.socket; do
  install -D -m 0644 "$pkg/systemd/$unit" "$stage/lib/systemd/system/$unit"
done

# QEMU's backend discovery file, pointing at where the package puts the binary.
mkdir -p "$stage/usr/share/qemu/vhost-user"
python3 - docs/50-vhost-relay.json "$stage/usr/share/qemu/vhost-user/50-vhost-relay.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["binary"] = "/usr/bin/vhost-relay"
open(sys.argv[2], "w").write(json.dumps(d, indent=2) + "\n")
PY

install -D -m 0644 "$pkg/vhost-relay.toml" "$stage/etc/vhost-relay/vhost-relay.toml"

# The generator is an example (dev profile): building it cannot touch the release binary.
mkdir -p "$stage/usr/share/man/man1"
cargo run -q --locked -p vhost-relay --example vhost-relay-man | gzip -9n >"$stage/usr/share/man/man1/vhost-relay.1.gz"

doc=$stage/usr/share/doc/vhost-relay
install -D -m 0644 docs/usage.md "$doc/usage.md"
{
  cat "$pkg/debian/copyright"
  # The binary links these crates statically; each keeps its own licence.
  printf '\nFiles: *\nCopyright: see each crate\nLicense: various\nComment: statically linked Rust crates (name, version, licence):\n'
  cargo tree --locked -p vhost-relay -e normal,no-proc-macro --target "$(rustc -vV | sed -n 's/^host: //p')" \
      --prefix none --format '{p} {l}' |
    grep -v ' (/' | sed 's/ (\*)$//' | sort -u | sed 's/^/ /'
} >"$doc/copyright"
chmod 0644 "$doc/copyright"

mkdir -p "$stage/DEBIAN"
install -m 0755 "$pkg/debian/postinst" "$pkg/debian/prerm" "$pkg/debian/postrm" "$stage/DEBIAN/"
echo /etc/vhost-relay/vhost-relay.toml >"$stage/DEBIAN/conffiles"

# dpkg-shlibdeps wants a debian/control naming the package; a minimal one in a scratch dir.
shlibs=$out/shlibs
rm -rf "$shlibs" && mkdir -p "$shlibs/debian"
printf 'Source: vhost-relay\n\nPackage: vhost-relay\nArchitecture: any\n' >"$shlibs/debian/control"
depends=$(cd "$shlibs" && dpkg-shlibdeps -O "$stage/usr/bin/vhost-relay" | sed -n 's/^shlibs:Depends=//p')

cat >"$stage/DEBIAN/control" <<CONTROL
Package: vhost-relay
Version: $version
Architecture: $arch
Maintainer: ${DEB_MAINTAINER:-vhost-relay developers <vhost-relay@invalid>}
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Depends: ${depends:-libc6}
Suggests: qemu-system-x86, libvirt-daemon-system
Section: net
Priority: optional
Description: vhost-user virtio-net backend relaying guest NICs to VF netdevs
 vhost-relay serves QEMU's vhost-user virtio-net devices and relays each guest NIC's
 packets to an SR-IOV VF netdev (AF_PACKET or AF_XDP), loops them back, or hands the
 guest's rings to a vhost-vdpa device.
 .
 Ships systemd units for one process serving many ports (vhost-relay.service) and for
 one socket-activated port per instance (vhost-relay@.socket), QEMU's vhost-user
 descriptor and an example configuration. No unit is enabled on installation.
CONTROL

dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
