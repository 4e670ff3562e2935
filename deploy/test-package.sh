#!/bin/bash
# Builds the Debian package and puts it through its life on this (Debian) machine:
# install, files, user, log folder, `check` of the shipped config, upgrade to a
# version-bumped package with a locally modified conffile, removal, purge.
#
# Run as root on a machine where quadrige-proxy is not installed; it leaves none of it
# behind (it purges the package when it fails, too). The quadrige-proxy system user is
# kept after the purge, as Debian does for system users.
#
# What it cannot test: starting the unit. systemd is not PID 1 in this container, so the
# start, reload and stop of quadrige-proxy.service are not exercised here (the unit file
# is checked with systemd-analyze when available; tests/systemd.rs covers the notify
# protocol, reloads and socket activation of the binary itself).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }
ok() { printf '  ok: %s\n' "$*"; }
fail() { printf '  FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root: it installs a package"
command -v dpkg >/dev/null || fail "not a Debian system (no dpkg)"
if dpkg -s quadrige-proxy >/dev/null 2>&1; then
    fail "quadrige-proxy is already installed here: this test would change it (apt-get purge quadrige-proxy first)"
fi

installed=0
cleanup() {
    status=$?
    if [ "$status" != 0 ] && [ "$installed" = 1 ]; then
        echo "cleaning up after the failure: purging the package" >&2
        DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq quadrige-proxy >/dev/null 2>&1 || dpkg --purge quadrige-proxy >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

apt_install() {
    # apt-get resolves the dependencies (adduser); dpkg -i is the fallback when the
    # package lists cannot be reached.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Options::=--force-confold "$1" ; then
        echo "  apt-get failed, trying dpkg -i" >&2
        dpkg --force-confold -i "$1"
    fi
}

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)

step "build quadrige-proxy ${version}-1"
deploy/build-deb.sh
deb1="target/debian/quadrige-proxy_${version}-1_${arch}.deb"
[ -f "$deb1" ] || fail "no $deb1"
ok "$deb1 ($(du -h "$deb1" | cut -f1))"
dpkg-deb --info "$deb1" | sed -n '/Package:/,$p' | grep -E '^ (Package|Version|Depends|Recommends|Section):'
echo "  contents:"
dpkg-deb --contents "$deb1" | awk '{print "    " $6 ($7 ? " " $7 " " $8 : "")}' | grep -v '/$'

step "install with apt-get install ./$(basename "$deb1")"
installed=1
apt_install "./$deb1"
[ "$(dpkg-query -W -f='${Status} ${Version}' quadrige-proxy)" = "install ok installed ${version}-1" ] || fail "not installed"
ok "dpkg: $(dpkg-query -W -f='${Status} ${Version}' quadrige-proxy)"

step "files"
[ -x /usr/bin/quadrige-proxy ] || fail "/usr/bin/quadrige-proxy"
ok "/usr/bin/quadrige-proxy: $(quadrige-proxy --version)"
unit=""
for dir in /usr/lib/systemd/system /lib/systemd/system; do
    [ -f "$dir/quadrige-proxy.service" ] && unit="$dir/quadrige-proxy.service" && break
done
[ -n "$unit" ] || fail "no quadrige-proxy.service installed"
cmp -s "$unit" deploy/quadrige-proxy.service || fail "$unit differs from deploy/quadrige-proxy.service"
ok "$unit (deploy/quadrige-proxy.service)"
[ -f "$(dirname "$unit")/quadrige-proxy.socket" ] && ok "$(dirname "$unit")/quadrige-proxy.socket (optional socket activation, not enabled)"
if [ -e /etc/systemd/system/multi-user.target.wants/quadrige-proxy.service ]; then
    fail "the unit was enabled at install: it must not be"
fi
ok "the unit is not enabled (no multi-user.target.wants link) and was not started"
dpkg-query -W -f='${Conffiles}\n' quadrige-proxy | grep -q '/etc/quadrige-proxy/proxy.toml' || fail "proxy.toml is not a conffile"
dpkg-deb --fsys-tarfile "$deb1" | tar -xO ./etc/quadrige-proxy/proxy.toml > /tmp/qp-packaged.toml
cmp -s /etc/quadrige-proxy/proxy.toml /tmp/qp-packaged.toml || fail "/etc/quadrige-proxy/proxy.toml is not the packaged one"
rm -f /tmp/qp-packaged.toml
grep -q 'production equivalent of the Apache config GeoNature installs' /etc/quadrige-proxy/proxy.toml \
    || fail "/etc/quadrige-proxy/proxy.toml is not config/geonature.toml"
ok "/etc/quadrige-proxy/proxy.toml: conffile, config/geonature.toml"
dpkg-query -W -f='${Conffiles}\n' quadrige-proxy | grep -q '/etc/logrotate.d/quadrige-proxy' || fail "no logrotate conffile"
grep -q 'systemctl reload quadrige-proxy' /etc/logrotate.d/quadrige-proxy || fail "logrotate does not reload"
ok "/etc/logrotate.d/quadrige-proxy: conffile, reloads the proxy after rotating"
if command -v logrotate >/dev/null; then
    logrotate -d /etc/logrotate.d/quadrige-proxy >/dev/null 2>&1 || fail "logrotate -d refuses the file"
    ok "logrotate -d accepts it"
fi
for f in /usr/share/bash-completion/completions/quadrige-proxy \
         /usr/share/zsh/vendor-completions/_quadrige-proxy \
         /usr/share/fish/vendor_completions.d/quadrige-proxy.fish; do
    [ -s "$f" ] || fail "missing completion $f"
done
bash -c 'source /usr/share/bash-completion/completions/quadrige-proxy && complete -p quadrige-proxy' >/dev/null \
    || fail "the bash completion does not load"
ok "completions for bash (loads), zsh and fish"
for page in quadrige-proxy quadrige-proxy-check quadrige-proxy-import-apache; do
    f=/usr/share/man/man1/$page.1.gz
    [ -s "$f" ] || fail "missing man page $f"
    zcat "$f" | grep -q '^\.TH' || fail "$f is not a man page"
done
ok "man pages: quadrige-proxy(1), quadrige-proxy-check(1), quadrige-proxy-import-apache(1)"
[ -f /usr/share/doc/quadrige-proxy/MIGRATION.md ] && [ -f /usr/share/doc/quadrige-proxy/copyright ] || fail "docs"
ok "/usr/share/doc/quadrige-proxy: README.md, MIGRATION.md, copyright, examples/"

step "user and log folder"
entry=$(getent passwd quadrige-proxy) || fail "no quadrige-proxy user"
uid=$(echo "$entry" | cut -d: -f3)
shell=$(echo "$entry" | cut -d: -f7)
[ "$uid" -lt 1000 ] || fail "quadrige-proxy is not a system user (uid $uid)"
case "$shell" in */nologin|*/false) ;; *) fail "quadrige-proxy has a login shell: $shell" ;; esac
getent group quadrige-proxy >/dev/null || fail "no quadrige-proxy group"
ok "user: $entry"
[ "$(stat -c '%U:%G %a' /var/log/quadrige-proxy)" = "quadrige-proxy:adm 750" ] || fail "/var/log/quadrige-proxy: $(stat -c '%U:%G %a' /var/log/quadrige-proxy)"
ok "/var/log/quadrige-proxy: quadrige-proxy:adm 750"

step "check the shipped config (its GeoNature folders and certificates do not exist here)"
for p in /home/geonatureadmin/geonature /etc/letsencrypt/live/geonature.example.org; do
    [ -e "$p" ] && echo "  (note: $p exists on this machine)"
done
quadrige-proxy check --config /etc/quadrige-proxy/proxy.toml | sed 's/^/  | /'
runuser -u quadrige-proxy -- quadrige-proxy check --config /etc/quadrige-proxy/proxy.toml >/dev/null \
    || fail "the quadrige-proxy user cannot check its own config"
ok "check passes, as root and as the quadrige-proxy user"
quadrige-proxy import-apache --root tests/fixtures/apache/gn-2.12 \
    tests/fixtures/apache/gn-2.12/etc/apache2/sites-available/geonature.conf > /tmp/quadrige-proxy-import.toml 2>/dev/null
quadrige-proxy check --config /tmp/quadrige-proxy-import.toml >/dev/null || fail "import-apache output refused"
rm -f /tmp/quadrige-proxy-import.toml
ok "import-apache on the GeoNature 2.12 fixture gives a config check accepts"

if [ -d /run/systemd/system ]; then
    echo "  systemd is running: the unit is still not started here, so as not to take ports 80/443"
else
    echo "  NOT TESTED: systemd is not PID 1 here ($(ps -o comm= -p 1)), so the unit cannot be started, reloaded or stopped"
fi
if command -v systemd-analyze >/dev/null; then
    if systemd-analyze verify "$unit" >/tmp/qp-verify.log 2>&1; then
        ok "systemd-analyze verify $unit"
    else
        echo "  systemd-analyze verify $unit said:"; sed 's/^/    /' /tmp/qp-verify.log
    fi
    rm -f /tmp/qp-verify.log
fi

step "upgrade to ${version}-2 with a locally modified conffile"
echo "# local change kept across upgrades" >> /etc/quadrige-proxy/proxy.toml
deploy/build-deb.sh --deb-version "${version}-2"
deb2="target/debian/quadrige-proxy_${version}-2_${arch}.deb"
[ -f "$deb2" ] || fail "no $deb2"
apt_install "./$deb2"
[ "$(dpkg-query -W -f='${Version}' quadrige-proxy)" = "${version}-2" ] || fail "not upgraded"
ok "dpkg: $(dpkg-query -W -f='${Status} ${Version}' quadrige-proxy)"
grep -q '^# local change kept across upgrades$' /etc/quadrige-proxy/proxy.toml || fail "the modified conffile was replaced"
[ ! -e /etc/quadrige-proxy/proxy.toml.dpkg-new ] || fail "a .dpkg-new was left"
ok "the modified /etc/quadrige-proxy/proxy.toml was kept"
quadrige-proxy check --config /etc/quadrige-proxy/proxy.toml >/dev/null || fail "check after upgrade"
getent passwd quadrige-proxy >/dev/null || fail "user lost in the upgrade"
ok "check passes after the upgrade; the user is still there"

step "remove"
DEBIAN_FRONTEND=noninteractive apt-get remove -y -q quadrige-proxy
[ ! -e /usr/bin/quadrige-proxy ] || fail "/usr/bin/quadrige-proxy left after remove"
[ -f /etc/quadrige-proxy/proxy.toml ] || fail "remove deleted the conffile (only purge should)"
[ "$(dpkg-query -W -f='${Status}' quadrige-proxy)" = "deinstall ok config-files" ] || fail "state after remove"
ok "binary and unit gone; the conffile stays until purge (dpkg: config-files)"

step "purge"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q quadrige-proxy
installed=0
! dpkg -s quadrige-proxy >/dev/null 2>&1 || fail "still known to dpkg"
[ ! -e /etc/quadrige-proxy ] || fail "/etc/quadrige-proxy left after purge"
[ ! -e /var/log/quadrige-proxy ] || fail "/var/log/quadrige-proxy left after purge"
[ ! -e /etc/logrotate.d/quadrige-proxy ] || fail "logrotate file left after purge"
ok "/etc/quadrige-proxy, /var/log/quadrige-proxy and the logrotate file are gone"
getent passwd quadrige-proxy >/dev/null && ok "the quadrige-proxy system user is kept (Debian practice; deluser --system quadrige-proxy removes it)"

printf '\nPACKAGE TEST PASSED\n'
