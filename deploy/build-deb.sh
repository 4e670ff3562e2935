#!/bin/sh
# Builds the Debian package (target/debian/quadrige-proxy_VERSION-1_ARCH.deb): the
# release binary, then the shell completions and man pages it generates from its own
# command line (clap_complete, clap_mangen), then `cargo deb --no-build` packs them with
# the assets listed under [package.metadata.deb] in Cargo.toml.
# Extra arguments go to cargo deb, e.g.  deploy/build-deb.sh --deb-version 0.1.0-2
set -eu
cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "cargo-deb is missing: cargo install cargo-deb --locked" >&2
    cargo install cargo-deb --locked
fi

cargo build --release --locked
bin=target/release/quadrige-proxy
out=target/deb-assets
rm -rf "$out"
mkdir -p "$out/completions" "$out/man"
"$bin" completions bash > "$out/completions/quadrige-proxy"
"$bin" completions zsh > "$out/completions/_quadrige-proxy"
"$bin" completions fish > "$out/completions/quadrige-proxy.fish"
"$bin" manpages "$out/man"
gzip -9n "$out"/man/*.1

# Stripped: the release profile keeps line tables (debug = 1) for profiling, which
# would make the installed binary several times larger.
cargo deb --no-build --strip "$@"
