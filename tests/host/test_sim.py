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


def test_sim_outages_and_health_give_heap_figures(tmp_path):
    # Outages at 4 s and 8 s through the sim's fault proxy; health every ~0.5 s gives the heap
    # figures. first_window 0.5 s and stable_s 1 s so that both devices are back between the
    # outages: with the default 30 s, connections of under 4 s never count as stable and each
    # outage's retry delays grow from the last one's (the policy for a flapping link).
    lines = run_sim(tmp_path, "--devices", "2", "--processes", "2", "--duration", "12",
                    "--interval", "0.5", "--outage-every", "4", "--outage-for", "1.5",
                    "--first-window", "0.5", "--stable-s", "1", "--health-interval", "0.5",
                    "--heapsize", "256k")
    summary = json.loads(lines[-1])
    assert summary["gaps"] == 0 and summary["memory_errors"] == 0
    assert summary["telemetry"] >= 2 * 12, "telemetry kept flowing around the outages"
    outages = [l for l in lines if l.startswith("sim: outage ")]
    assert len(outages) == 2 and summary["outages"] == 2, outages
    # Both devices were connected when the first outage cut, and both came back.
    assert summary["outage_cuts"] >= 2 and summary["reconnects"] >= 2
    births = [l for l in lines if "/status {" in l and '"online"' in l]
    assert len(births) >= 2 + 2, "a birth message per device and per reconnect"
    assert summary["heap_samples"] >= 10
    assert 16 * 1024 < summary["heap_min_bytes"] <= summary["heap_max_bytes"] < 256 * 1024
    assert isinstance(summary["heap_slope_bytes_per_hour"], float)
    assert not any("MemoryError" in l for l in lines)
