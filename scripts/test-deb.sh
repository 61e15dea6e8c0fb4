#!/usr/bin/env bash
# Builds the Debian package (scripts/build-deb.sh), installs it into this machine with dpkg,
# checks what it installed, removes it (only the conffile may stay), then purges it.
# Run by scripts/test.sh. Needs root. Refuses to run if a vhost-relay package, or any file
# the package would own, is already there: it must not replace anything it did not install.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

fail() { echo "test-deb.sh: $*" >&2; exit 1; }

conffile=/etc/vhost-relay/vhost-relay.toml
units=(vhost-relay.service vhost-relay@.service vhost-relay@.socket)
owned=(/usr/bin/vhost-relay "$conffile" /usr/share/qemu/vhost-user/50-vhost-relay.json
       /usr/share/man/man1/vhost-relay.1.gz /usr/share/doc/vhost-relay "${units[@]/#//lib/systemd/system/}")

[ "$(id -u)" = 0 ] || fail "needs root (it installs the package with dpkg)"
state=$(dpkg-query -W -f='${db:Status-Status}' vhost-relay 2>/dev/null || true)
if [ -n "$state" ] && [ "$state" != not-installed ]; then
  fail "a vhost-relay package is already on this machine ($state); remove it first: dpkg -P vhost-relay"
fi
for f in "${owned[@]}"; do
  [ ! -e "$f" ] || fail "$f exists and belongs to no package; move it away first"
done

deb=$(bash scripts/build-deb.sh | tail -n1)
[ -f "$deb" ] || fail "build-deb.sh made no package"

# From here on the package is ours: whatever happens, leave the machine as it was.
trap 'dpkg -P vhost-relay >/dev/null 2>&1 || true' EXIT
dpkg -i "$deb"

echo "--- the installed binary prints the vhost-user capabilities"
/usr/bin/vhost-relay --print-capabilities |
  python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["type"] == "net", d; print(d)'

echo "--- QEMU's descriptor names the installed binary"
python3 - <<'PY'
import json, os
d = json.load(open("/usr/share/qemu/vhost-user/50-vhost-relay.json"))
assert d["type"] == "net" and d["binary"] == "/usr/bin/vhost-relay", d
assert os.access(d["binary"], os.X_OK), d["binary"]
print(d)
PY

echo "--- the man page documents every option of --help"
page=$(MANWIDTH=200 man -l /usr/share/man/man1/vhost-relay.1.gz 2>/dev/null | col -b)
grep -q '^NAME' <<<"$page" || fail "the man page does not render"
opts=$(/usr/bin/vhost-relay --help | grep -oE -- '--[a-z][a-z-]+' | sort -u)
[ "$(wc -l <<<"$opts")" -gt 10 ] || fail "--help lists too few options: $opts"
for o in $opts; do
  grep -qe "$o" <<<"$page" || fail "the man page lacks $o"
done
echo "$(wc -w <<<"$opts") options, all in the man page"
[ "$(man -w vhost-relay)" = /usr/share/man/man1/vhost-relay.1.gz ] || fail "man vhost-relay does not find the page"

echo "--- the installed units pass systemd-analyze verify (Documentation= man page included)"
for u in "${units[@]}"; do
  said=$(systemd-analyze verify "/lib/systemd/system/$u" 2>&1) || fail "$u: $said"
  [ -z "$said" ] || fail "$u: $said"
done
echo "ok: ${units[*]}"

echo "--- the example config is a conffile"
dpkg-query -W -f='${Conffiles}\n' vhost-relay | grep -q "^ $conffile " || fail "$conffile is not a conffile"

echo "--- dpkg -r leaves only the conffile"
mapfile -t files < <(dpkg -L vhost-relay)
dpkg -r vhost-relay
[ "$(dpkg-query -W -f='${db:Status-Status}' vhost-relay)" = config-files ] || fail "not in state config-files after dpkg -r"
[ -f "$conffile" ] || fail "dpkg -r removed the conffile $conffile"
[ "$(ls -A /etc/vhost-relay)" = "${conffile##*/}" ] || fail "dpkg -r left more than the conffile in /etc/vhost-relay"
for f in "${files[@]}"; do
  case $f in /. | "$conffile" | /etc/vhost-relay) continue ;; esac
  if [ -d "$f" ]; then
    # A directory may stay only while it holds others' files (/usr/bin, /lib/systemd/system).
    [ -n "$(ls -A "$f")" ] || fail "dpkg -r left the empty directory $f"
  elif [ -e "$f" ]; then
    fail "dpkg -r left $f"
  fi
done
echo "ok: ${#files[@]} paths gone or shared, $conffile kept"

echo "--- dpkg -P removes the conffile too"
dpkg -P vhost-relay
trap - EXIT
[ ! -e "$conffile" ] && [ ! -e /etc/vhost-relay ] || fail "dpkg -P left /etc/vhost-relay"
state=$(dpkg-query -W -f='${db:Status-Status}' vhost-relay 2>/dev/null || true)
[ -z "$state" ] || [ "$state" = not-installed ] || fail "still known to dpkg after dpkg -P: $state"
echo "test-deb.sh: ok ($deb)"
