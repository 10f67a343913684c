#!/usr/bin/env bash
# Main job: install what is needed, then generate with and without T-GATE and print the speed-up.
# Extra arguments go to `tgate-fx generate` (see `tgate-fx generate --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
cd "$root"
# Idle OpenMP threads sleep instead of spinning: on a machine shared with other
# work, spinning threads stall each other and make small models 10x slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec tgate-fx generate "$@"
