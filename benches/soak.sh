#!/bin/sh
# The soak (tests/soak.rs): the release binary under mixed traffic (small API calls, long
# requests, 8 MiB downloads, 4 MiB uploads, malformed requests) with a configuration
# reload (SIGHUP) every 3 s. It reports lost and corrupted responses (both must be 0),
# the proxy's RSS and open descriptors over time, and fails if memory grows or
# descriptors are left open.
#
# Usage: benches/soak.sh [MINUTES]      (default: 2)
set -eu
cd "$(dirname "$0")/.."
minutes=${1:-2}
SOAK_SECS=$((minutes * 60)) exec cargo test --release --locked --test soak -- --ignored --nocapture
