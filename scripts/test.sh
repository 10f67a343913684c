#!/usr/bin/env bash
# Install what is needed, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
cd "$root"
# Idle OpenMP threads sleep instead of spinning (see generate.sh): a shared CPU otherwise slows tiny models 10x.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# The test models are tiny: one thread per op is faster than two threads synchronising on 2 cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q "$@"
