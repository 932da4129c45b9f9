"""tools/sim.py as an operator runs it: its own broker, a fleet, a JSON summary at the end."""
import json
import os
import subprocess
import sys

from tools.devices import ROOT


def run_sim(tmp_path, *args):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "sim.py"), "--workdir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout.strip().splitlines()


def test_sim_runs_a_fleet_and_prints_a_summary(tmp_path):
    lines = run_sim(tmp_path, "--devices", "4", "--duration", "5", "--interval", "0.5",
                    "--processes", "2")
    summary = json.loads(lines[-1])
    assert summary["devices"] == 4 and summary["online"] == 4
    assert summary["telemetry"] >= 4 * 4
    assert summary["gaps"] == 0 and summary["duplicates"] == 0
    assert any('devices/sim-0003/telemetry {"' in l for l in lines), "prints what arrives"
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".img")]) == 4


def test_sim_rejects_bad_arguments(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "sim.py"), "--devices", "0"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2 and "--devices must be at least 1" in r.stderr
