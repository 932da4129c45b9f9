"""make bench refuses a run that measured nothing (bench/run.py missing_figures): the
64-bit soak once ran on a build whose devices died at every boot and wrote zeros and nulls
into bench/results.json without a word."""
import importlib.util
import os

from testbed.devices import ROOT


def _run_module():
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "bench",
                                                                            "run.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_missing_or_empty_figures_are_named():
    run = _run_module()
    good = {"boot_to_first_publish_ms": 120.5, "boot_min_heap_kb": 176, "soak_telemetry": 88,
            "soak_heap_samples": 12}
    assert run.missing_figures({"device"}, good) == []
    broken = {"boot_to_first_publish_ms": None, "boot_min_heap_kb": None, "soak_telemetry": 0,
              "soak_heap_samples": 0}
    missing = run.missing_figures({"device"}, broken)
    assert "boot_to_first_publish_ms (part device)" in missing
    assert "boot_min_heap_kb (part device)" in missing
    assert [m for m in missing if m.startswith("soak_telemetry is 0")]
    # A part that was not run is not asked for.
    assert run.missing_figures({"device"}, dict(good, qos1_pipelined_msg_s=None)) == []
    assert run.missing_figures({"mqtt"}, {}) == ["qos1_pipelined_msg_s (part mqtt)"]
