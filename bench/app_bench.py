"""Application API figures (issue 26), host side (CPython), run by bench/run.py when `make
board-model` has built the 32-bit Unix port (build/board-model/micropython, or
BOARD_MODEL=PATH): the heap a board holds with no app, with an empty app, and with each
example app. Prints progress on stderr and one JSON line of figures on stdout; each
variant's statistics go to bench/app_heap.json.

Every variant is one device on the frozen 32-bit build in the same heap as
board_model_bench.py's soak (96 KiB), against a private mosquitto, with no outage:
telemetry every 1 s, health every 1 s. Its held heap is the health messages' heap_alloc
(measured on the device right after a gc.collect()) from WARM_S after the first connect
on, for MEASURE_S; each variant runs ROUNDS times, the variants interleaved (none, empty,
..., none, empty, ...) so a drift of the host does not fall on one variant. The statistic
is the median (statistics.median_low: a value a message reported) of all those samples:
in a steady run heap_alloc sits at one level to within a block or two (p10 = p90), but now
and then a message catches something in flight when its collect runs (a telemetry message,
a stale pointer the conservative scan of the stack keeps alive: up to ~700 bytes more, once
in a minute); the median is that level, untouched by a single spike, where the max of
board_model_bench.py's soak takes the spikes and outages in. Full run: WARM_S 60, MEASURE_S
60, 2 rounds (4 min per variant); QUICK=1: 20 s, 30 s, 1 round (APP_BENCH_WARM_S,
APP_BENCH_MEASURE_S and APP_BENCH_ROUNDS override them).

board_model_app_none_heap_held_bytes: the median without an app (board_model_bench.py's
board_model_heap_held_bytes is the largest heap_alloc of a soak with outages: higher).
app_api_heap_bytes: an empty app (`def setup(dev): pass`) minus no app: what hosting an
app costs (firmware/apphost.py, firmware/api.py, the Dev, the app's module).
app_example_heap_bytes: {name: that app minus no app} for the checkout's app/ and
examples/env_sensor and examples/relay, whichever of them exist when the bench runs.
app_sim_hw_heap_bytes: an app that only asks the board for an I2C bus and a pin (what the
examples use) minus the empty app: the Unix board's simulated hardware
(firmware/boards/unixhw.py), which env_sensor's and relay's figures include and which a
board's machine.I2C and machine.Pin do not cost. The apps are imported from source (as a
board imports app/*.py or app/*.mpy from its flash: their bytecode is in the heap), the
firmware is frozen.
"""
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from board_model_bench import SOAK_HEAP_KB, memory_errors  # noqa: E402
from firmware.bootconfig import validate  # noqa: E402
from testbed.broker import Mosquitto  # noqa: E402
from testbed.devices import DeviceProcess, Spec, binary_info, device_config  # noqa: E402
from testbed.observer import Observer  # noqa: E402

DETAIL_JSON = os.path.join(ROOT, "bench", "app_heap.json")
HEALTH_S = 1.0
TELEMETRY_S = 1.0
# The example apps measured, those of them that exist when the bench runs.
EXAMPLES = (("app", "app"), ("env_sensor", "examples/env_sensor"),
            ("relay", "examples/relay"))
EMPTY_APP = "def setup(dev):\n    pass\n"
# The hardware env_sensor and relay ask for (examples/*/__init__.py), kept referenced.
SIM_HW_APP = ("HW = []\n\n\ndef setup(dev):\n"
              "    HW.append(dev.board.i2c(0, scl=None, sda=None))\n"
              "    HW.append(dev.board.pin(22, out=True))\n")
# What the frozen build freezes (manifest_common.py, manifest_unix.py) and builds from.
FROZEN_SOURCES = ("firmware", "lib", "unixflash.py", "testbed/board_model",
                  "manifest_common.py", "manifest_unix.py")


def say(msg):
    print("app_bench: " + msg, file=sys.stderr, flush=True)


def source_files():
    out = []
    for s in FROZEN_SOURCES:
        p = os.path.join(ROOT, s)
        if os.path.isfile(p):
            out.append(p)
        for d, dirs, files in os.walk(p):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            out += [os.path.join(d, f) for f in sorted(files) if f.endswith((".py", ".h"))]
    return out


def provenance(binary):
    """Which firmware the binary holds, as far as the host can tell: the checkout's commit,
    whether the frozen sources differ from it, a digest of them, and the sources changed
    since the binary was built (then it holds an older firmware than the digest's)."""
    def git(*args):
        r = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    files = source_files()
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.relpath(f, ROOT).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read())
    built = os.stat(binary).st_mtime
    newer = [os.path.relpath(f, ROOT) for f in files if os.stat(f).st_mtime > built]
    dirty = git("status", "--porcelain", "--", *FROZEN_SOURCES)
    with open(binary, "rb") as f:
        bin_sha = hashlib.sha256(f.read()).hexdigest()[:12]
    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(dirty),
        "sources_sha256": h.hexdigest()[:12],
        "binary_sha256": bin_sha,
        "built": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(built)),
        "newer_sources": newer,
    }


def write_app(tmp, name, text):
    d = os.path.join(tmp, "apps", name)
    os.makedirs(d)
    with open(os.path.join(d, "__init__.py"), "w") as f:
        f.write(text)
    return d


def variants(tmp):
    """[(name, app directory or None, kind)]: kind none, api, hw or example."""
    v = [("none", None, "none"), ("empty", write_app(tmp, "empty", EMPTY_APP), "api"),
         ("sim_hw", write_app(tmp, "sim_hw", SIM_HW_APP), "hw")]
    for name, rel in EXAMPLES:
        d = os.path.join(ROOT, rel)
        if os.path.isfile(os.path.join(d, "__init__.py")):
            v.append((name, d, "example"))
        else:
            say("%s: no %s/__init__.py, not measured" % (name, rel))
    return v


def run_one(tmp, broker, binary, name, app, n, warm_s, measure_s):
    """One device with `app` (a directory, or None) for warm_s + measure_s after its first
    connect, no outage; returns its samples after warm_s and whether the run was sound."""
    dev = "ab-%s-%d" % (name.replace("_", "-"), n)
    cfg = device_config(dev, broker.host, broker.port, telemetry_interval=TELEMETRY_S,
                        health_interval=HEALTH_S)
    validate(json.loads(json.dumps(cfg)))  # the firmware's own checks, before a run
    samples = []  # (s since connected, heap_alloc, heap_largest_free)
    last = {}  # the last health document
    t0 = [None]
    lock = threading.Lock()

    def on_msg(t, topic, payload, retain):
        if t0[0] is None:
            return
        try:
            m = json.loads(payload)
            with lock:
                samples.append((t - t0[0], m["heap_alloc"], m.get("heap_largest_free")))
                last.clear()
                last.update(m)
        except (ValueError, KeyError):
            pass

    obs = Observer(broker.host, broker.port, topics=("devices/%s/health" % dev,),
                   on_message=on_msg, record=False)
    p = DeviceProcess([Spec(os.path.join(tmp, dev + ".img"), config=cfg, app=app)], tmp,
                      heapsize="%dk" % SOAK_HEAP_KB, micropython=binary)
    p.start()
    try:
        try:
            p.wait_line(r" I connected", 30)
        except AssertionError:
            return {"ok": False, "why": "never connected", "samples": [],
                    "output": p.output()}
        t0[0] = time.monotonic()
        end = t0[0] + warm_s + measure_s
        while time.monotonic() < end and p.alive():
            time.sleep(0.2)
        out = p.output()
        alive = p.alive()
    finally:
        p.kill()
        obs.close()
    with lock:
        hs = [s for s in samples if s[0] >= warm_s]
        doc = dict(last)
    errors = memory_errors(out)
    connects = out.count(" I connected")
    host = doc.get("app")
    why = ("process died" if not alive else "watchdog reset" if p.resets else
           "out of memory" if errors else "traceback" if "Traceback" in out else
           "reconnected" if connects != 1 else
           "no health after the warm-up" if not hs else "")
    if not why:
        if app is None and host is not None:
            why = "an app is loaded on the device without one"
        elif app is not None and not (host and host.get("loaded") and not host.get("error")):
            why = "the app did not start: %s" % (host and host.get("error"))
        elif host and any(s["errors"] or s["timeouts"] for s in host["sensors"].values()):
            why = "app sensor errors: %s" % host["sensors"]
    return {"ok": not why, "why": why, "samples": hs, "output": out}


def stats(values):
    v = sorted(values)
    q = statistics.quantiles(v, n=10, method="inclusive") if len(v) > 1 else v * 9
    return {"median": statistics.median_low(v), "min": v[0], "max": v[-1],
            "p10": round(q[0]), "p90": round(q[-1]), "samples": len(v)}


def main():
    quick = os.environ.get("QUICK") == "1"
    warm_s = float(os.environ.get("APP_BENCH_WARM_S", 20 if quick else 60))
    measure_s = float(os.environ.get("APP_BENCH_MEASURE_S", 30 if quick else 60))
    rounds = int(os.environ.get("APP_BENCH_ROUNDS", 1 if quick else 2))
    binary = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                             os.path.join(ROOT, "build", "board-model", "micropython"))
    info = binary_info(binary)
    if not info["frozen"]:
        raise SystemExit("%s has no firmware frozen in (make board-model builds one)" % binary)
    prov = provenance(binary)
    if prov["newer_sources"]:
        say("WARNING: %d frozen source file(s) changed after %s was built (%s...): it holds "
            "an older firmware; make board-model to measure this one"
            % (len(prov["newer_sources"]), os.path.relpath(binary, ROOT),
               ", ".join(prov["newer_sources"][:3])))
    figures = {
        "app_bench_binary": os.path.relpath(binary, ROOT),
        "app_bench_build": "%s; %d-bit%s%s; built %s, sha256 %s" % (
            info["version"], info["bits"], ", firmware frozen" if info["frozen"] else "",
            ", TLS" if info["tls"] else ", no TLS", prov["built"], prov["binary_sha256"]),
        "app_bench_firmware": "%s%s, frozen sources sha256 %s%s" % (
            prov["commit"], " + uncommitted changes" if prov["dirty"] else "",
            prov["sources_sha256"],
            ("; %d changed since the build" % len(prov["newer_sources"]))
            if prov["newer_sources"] else ""),
        "app_bench_method": "median heap_alloc of health messages (after gc.collect), %d KiB "
                            "heap, health/telemetry %g/%g s, %g s after a %g s warm-up, "
                            "%d round(s), no outage" % (SOAK_HEAP_KB, HEALTH_S, TELEMETRY_S,
                                                       measure_s, warm_s, rounds),
    }
    detail = {}
    with tempfile.TemporaryDirectory() as tmp:
        vs = variants(tmp)
        pooled = {name: [] for name, _, _ in vs}
        bad = {}
        broker = Mosquitto(os.path.join(tmp, "broker"), persistence=False).start()
        try:
            n = 0
            for r in range(rounds):
                for name, app, _ in vs:
                    n += 1
                    res = run_one(tmp, broker, binary, name, app, n, warm_s, measure_s)
                    heap = [a for _, a, _ in res["samples"]]
                    if not res["ok"]:
                        bad[name] = res["why"]
                        say("%s, round %d: %s; the device's last output:\n%s"
                            % (name, r + 1, res["why"], res["output"][-3000:]))
                        continue
                    pooled[name] += heap
                    s = stats(heap)
                    detail.setdefault(name, {"rounds": []})["rounds"].append(s)
                    say("%s, round %d: heap_alloc median %d (p10 %d, p90 %d, min %d, max %d, "
                        "%d samples)" % (name, r + 1, s["median"], s["p10"], s["p90"],
                                         s["min"], s["max"], s["samples"]))
        finally:
            broker.stop()
    held = {}
    for name, app, kind in vs:
        if pooled[name] and name not in bad:
            s = stats(pooled[name])
            detail[name].update(s, app=os.path.relpath(app, ROOT) if app and kind == "example"
                                else kind)
            held[name] = s["median"]
    base = held.get("none")
    figures["board_model_app_none_heap_held_bytes"] = base

    def minus(name, ref):
        return held[name] - ref if name in held and ref is not None else None

    figures["app_api_heap_bytes"] = minus("empty", base)
    figures["app_sim_hw_heap_bytes"] = minus("sim_hw", held.get("empty"))
    figures["app_example_heap_bytes"] = {name: minus(name, base) for name, _, kind in vs
                                         if kind == "example"}
    if bad:
        figures["app_bench_failures"] = bad
    with open(DETAIL_JSON, "w") as f:
        json.dump({"method": figures["app_bench_method"], "binary": figures["app_bench_build"],
                   "firmware": figures["app_bench_firmware"], "variants": detail},
                  f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
