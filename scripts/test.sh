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
# One worker process per core (at most 4; TGATE_FX_TEST_WORKERS overrides, 0 = no workers), each test file
# on one worker so that its module fixtures (the full-size captures of test_macs.py) are made once.
workers="${TGATE_FX_TEST_WORKERS:-$(python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
exec python -m pytest -q -n "$workers" --dist loadfile "$@"
