"""Device benchmarks, host side (CPython driving Unix-port devices), run by bench/run.py:
boot to first publish with a cached config, and the memory soak through testbed/sim.py.
Prints progress on stderr and one JSON line of figures on stdout.

boot_to_first_publish_ms: a device whose /config.json is already on its flash (it booted
once with it, then stopped gracefully) is started again with its flash image only; the time
runs from just before the process is spawned to the first telemetry PUBLISH of the new boot
as it passes a FaultProxy between the device and mosquitto (device -> broker, on the wire).
Which PUBLISH is the new boot's is decided by an Observer on the broker: it reads the
payloads, and any telemetry of an earlier boot that the outbox resends first (what was in
flight at the stop) is skipped. The compiled firmware (build/, as `make mpy`) runs, on the
Unix port's default heap, telemetry_interval 1. Median of BOOT_REPS boots; boot_to_connect_ms is the
part up to the CONNECT packet (process start, imports, flash, config, session state).

boot_min_heap_kb: the smallest heap, in 8 KiB steps from 128k, in which the compiled
firmware boots, connects and runs 3 s without a MemoryError (target: 128).

soak_*: `testbed/sim.py --build --heapsize 184k --devices 1 --interval 1 --duration 600
--outage-every 60 --outage-for 10 --health-interval 5 --quiet` (QUICK=1: 90 s, an outage
every 20 s for 5 s, health every 2 s; SOAK_HEAP=128k for another heap); its last JSON line gives memory_errors and the heap
figures from the device's health messages (heap_alloc after gc.collect()).

--micropython PATH (or $MICROPYTHON) measures another MicroPython binary; one with the
firmware frozen in (make board-model) runs it instead of build/ (and the soak without
--build). micropython_binary and micropython_build say which binary the figures are of.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testbed.broker import Mosquitto  # noqa: E402
from testbed.devices import (DeviceProcess, Spec, binary_info, device_config,  # noqa: E402
                           micropython_path)
from testbed.observer import Observer  # noqa: E402
from testbed.proxy import UP, FaultProxy  # noqa: E402
from testbed.sim import build_mpy  # noqa: E402

BOOT_REPS = 5
# The soak's heap. The target is 128k, but the firmware does not fit there yet on this
# 64-bit port (boot_min_heap_kb says where it does); the soak runs with headroom above that
# so that it measures leaks and fragmentation. SOAK_HEAP=128k (environment) to try the fit.
HEAP = os.environ.get("SOAK_HEAP") or "184k"
MIN_HEAP_STEPS_KB = range(128, 257, 8)
# Boot time is about start-up, not memory: the Unix port's default heap, so that the figure
# exists even while the firmware does not fit HEAP (the soak reports that).
BOOT_HEAP = None
SOAK_FULL = ["--duration", "600", "--outage-every", "60", "--outage-for", "10",
             "--health-interval", "5"]
SOAK_QUICK = ["--duration", "90", "--outage-every", "20", "--outage-for", "5",
              "--health-interval", "2"]


def say(msg):
    print("device_bench: " + msg, file=sys.stderr, flush=True)


def _telemetry(obs, since):
    """Telemetry the observer got after index `since`: (time, boot, seq) in arrival order."""
    with obs.cond:
        msgs = obs.messages[since:]
    out = []
    for t, topic, payload, _ in msgs:
        if topic.endswith("/telemetry"):
            m = json.loads(payload)
            out.append((t, m["boot"], m["seq"]))
    return out


def _wait_boot(obs, since, proc, boot, timeout=30.0):
    """Telemetry since `since` up to the first of boot >= `boot`; None if the device died."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        seen = _telemetry(obs, since)
        for k, x in enumerate(seen):
            if x[1] >= boot:
                return seen[:k + 1]
        if not proc.alive():
            return None
        time.sleep(0.005)  # arrival times are taken by the observer, not by this loop
    raise SystemExit("no telemetry of boot %d in %.0f s; device output:\n%s"
                     % (boot, timeout, proc.output()[-3000:]))


def _died(proc, what):
    say("%s: the device process exited (rc %s); its output:\n%s"
        % (what, proc.proc.returncode, proc.output()[-3000:]))


def boot_to_first_publish(tmp, main_py, reps=BOOT_REPS):
    with Mosquitto(os.path.join(tmp, "broker"), persistence=False) as broker:
        proxy = FaultProxy(broker.host, broker.port).start()
        obs = Observer(broker.host, broker.port, topics=("devices/+/telemetry",))
        try:
            image = os.path.join(tmp, "boot.img")
            cfg = device_config("boot-0", proxy.host, proxy.port, telemetry_interval=1)
            # First boot: puts /config.json on the flash (and creates the broker session).
            p = DeviceProcess([Spec(image, config=cfg)], tmp, heapsize=BOOT_HEAP,
                              main=main_py).start()
            try:
                first = _wait_boot(obs, 0, p, 1)
            finally:
                p.stop()
            if first is None:
                _died(p, "first boot")
                return {"boot_to_first_publish_ms": None}
            boot = first[-1][1]
            totals, connects, via_observer = [], [], []
            for i in range(reps):
                boot += 1
                mark = proxy.mark()
                with obs.cond:
                    since = len(obs.messages)
                t0 = time.monotonic()
                p = DeviceProcess([Spec(image)], tmp, heapsize=BOOT_HEAP, main=main_py).start()
                try:
                    seen = _wait_boot(obs, since, p, boot)
                finally:
                    p.stop()
                if seen is None:
                    _died(p, "boot %d" % boot)
                    return {"boot_to_first_publish_ms": None}
                k = len(seen) - 1
                if seen[k][1] != boot:
                    raise SystemExit("expected boot %d, got %d" % (boot, seen[k][1]))
                obs_t = seen[k][0]
                wire = [pk for pk in proxy.packets_since(mark, "PUBLISH", UP)
                        if pk.topic and pk.topic.endswith("/telemetry")]
                # The k telemetry messages before it were earlier boots' (outbox resends);
                # the broker forwards one client's QoS 1 messages in order.
                t1 = wire[k].t if len(wire) > k and wire[k].t <= obs_t else obs_t
                conn = proxy.packets_since(mark, "CONNECT", UP)
                totals.append((t1 - t0) * 1000)
                via_observer.append((obs_t - t0) * 1000)
                if conn:
                    connects.append((conn[0].t - t0) * 1000)
                say("boot %d: first publish %.0f ms (connect at %.0f ms, %d resent before it)"
                    % (boot, totals[-1], connects[-1] if conn else -1, k))
        finally:
            obs.close()
            proxy.stop()
    return {
        "boot_to_first_publish_ms": round(statistics.median(totals), 1),
        "boot_to_first_publish_max_ms": round(max(totals), 1),
        "boot_to_connect_ms": round(statistics.median(connects), 1) if connects else None,
    }


def boot_min_heap_kb(tmp, main_py):
    """The smallest heap (8 KiB steps) in which the compiled firmware boots, connects and
    keeps running for 3 s with no MemoryError."""
    with Mosquitto(os.path.join(tmp, "heapbroker"), persistence=False) as broker:
        for kb in MIN_HEAP_STEPS_KB:
            image = os.path.join(tmp, "heap%d.img" % kb)
            cfg = device_config("heap%d" % kb, broker.host, broker.port, telemetry_interval=0.2)
            p = DeviceProcess([Spec(image, config=cfg)], tmp, heapsize="%dk" % kb,
                              main=main_py).start()
            try:
                p.wait_line(r" I connected", 10)
                time.sleep(3)
                ok = p.alive() and "MemoryError" not in p.output()
            except AssertionError:
                ok = False
            finally:
                p.kill()
            say("boot at %dk: %s" % (kb, "ok" if ok else "fails"))
            if ok:
                return {"boot_min_heap_kb": kb}
    return {"boot_min_heap_kb": None}


def soak(tmp, quick, build=True):
    args = SOAK_QUICK if quick else SOAK_FULL
    cmd = [sys.executable, os.path.join(ROOT, "testbed", "sim.py"), "--heapsize", HEAP,
           "--devices", "1", "--interval", "1", "--quiet", "--workdir", os.path.join(tmp, "soak")]
    if build:
        cmd.insert(2, "--build")
    cmd += args
    say("soak: %s" % " ".join(cmd[2:]))
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=float(args[1]) + 180)
    if r.stderr.strip():
        sys.stderr.write(r.stderr)  # crashes and MemoryError tracebacks of the device
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise SystemExit("sim.py failed (rc %s):\n%s%s" % (r.returncode, r.stdout, r.stderr))
    s = json.loads(lines[-1])
    say("soak summary: %s" % lines[-1])
    return {
        "soak_duration_s": float(args[1]),
        "soak_heapsize": HEAP,
        "soak_memory_errors": s["memory_errors"],
        "soak_heap_slope_bytes_per_hour": s.get("heap_slope_bytes_per_hour"),
        "soak_heap_max_bytes": s.get("heap_max_bytes"),
        "soak_heap_samples": s.get("heap_samples", 0),
        "soak_telemetry": s["telemetry"],
        "soak_gaps": s["gaps"],
        "soak_reconnects": s.get("reconnects"),
        "soak_process_exits": s.get("process_exits", 0),
        "soak_watchdog_resets": s.get("watchdog_resets", 0),
    }


def build_figures(path):
    """Which binary the figures are of: micropython_binary (its path) and micropython_build
    (its sys.version, 32 or 64 bit, whether the firmware is frozen in, TLS)."""
    info = binary_info(path)
    rel = os.path.relpath(info["path"], ROOT)
    return {"micropython_binary": info["path"] if rel.startswith("..") else rel,
            "micropython_build": "%s; %d-bit%s%s" % (
                info["version"], info["bits"], ", firmware frozen" if info["frozen"] else "",
                ", TLS" if info["tls"] else ", no TLS")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micropython", metavar="PATH", default=os.environ.get("MICROPYTHON"),
                   help="MicroPython binary of the devices (default $MICROPYTHON, else the "
                        "venv's); one with the firmware frozen in runs it instead of build/")
    a = p.parse_args()
    if a.micropython:
        # Read by every DeviceProcess here and by the soak's testbed/sim.py.
        os.environ["MICROPYTHON"] = os.path.abspath(a.micropython)
    quick = os.environ.get("QUICK") == "1"
    figures = build_figures(micropython_path())
    frozen = binary_info()["frozen"]
    if frozen:
        main_py = None  # DeviceProcess runs a copy of main.py beside no firmware/
        say("%s: firmware frozen in, build/ not used" % figures["micropython_binary"])
    else:
        main_py, n = build_mpy()
        say("build/: %d .mpy files" % n)
    with tempfile.TemporaryDirectory() as tmp:
        figures.update(boot_to_first_publish(tmp, main_py))
        figures.update(boot_min_heap_kb(tmp, main_py))
        figures.update(soak(tmp, quick, build=not frozen))
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
