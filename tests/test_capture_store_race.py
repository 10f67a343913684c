"""Processes sharing one capture store (replicas on one volume): one export per key, and no torn entry."""

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.e2e  # fresh processes build tiny pipelines and run them end to end

PROCESSES = 3


def test_processes_racing_on_one_store_export_once_and_never_read_a_torn_entry(tmp_path):
    env = {**os.environ, "TGATE_FX_CAPTURE_CACHE": "1", "TGATE_FX_CACHE_DIR": str(tmp_path),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), *sys.path])}
    worker = os.path.join(os.path.dirname(__file__), "store_race_worker.py")
    start_at = time.time() + 25  # after every process has imported torch and built its pipeline
    procs = [subprocess.Popen([sys.executable, worker, str(start_at), "15"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(PROCESSES)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    # the entry's lock: exactly one process exported, the others waited and loaded its entry
    assert sorted(r["exports"] for r in results) == [0] * (PROCESSES - 1) + [1], results
    assert sum(not any(r["from_store"]) for r in results) == 1, results
    assert len({r["latents"] for r in results}) == 1  # the same picture whichever process exported
    # saves renamed over an entry while the others read it: every read found a whole, valid entry
    assert all(r["failed_loads"] == 0 and r["rejected"] == 0 for r in results), results
    assert not [f for _, _, files in os.walk(tmp_path) for f in files if f.startswith(".tmp_")]
