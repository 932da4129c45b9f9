"""`make bench`: run the benchmarks on the Unix port against a private mosquitto, print a
table, and merge the figures into bench/results.json (one flat object shared by all
benchmarks). Figures, not pass/fail: targets are printed beside them.

mqtt_bench.py, outbox_bench.py and ota_verify.py run inside MicroPython (ota_verify.py twice:
the time of one signature check, and, in a board's heap (OTA_VERIFY_HEAP), the smallest free
heap one needs, bisected, and its time there; on the board model too); device_bench.py
(CPython) times a device's boot to its first publish and runs the memory soak through
testbed/sim.py (10 min; QUICK=1: 90 s); ota_bench.py (CPython) times a whole OTA download of
the firmware over loopback and bisects the heap it adds, on the board model's plain build
too when there is one. board_model_bench.py adds the board_model_* figures
when `make board-model` has built the 32-bit binary (or BOARD_MODEL=PATH names one); without
it they are skipped, and it says why. app_bench.py (part app) measures on that binary too the
heap held without an app, with an empty one and with each example app (issue 26).
mcu_bench.py (part mcu, issue 27) counts instructions on the bare-metal builds of `make mcu`
under QEMU (build/mcu/m0, build/mcu/rv32): a telemetry message, a signature check, a drain of
1,000 queued messages, a config layer, the boot, and ours against umqtt.simple and mqtt_as
per publish; without the builds it says why and measures nothing.

    .venv/bin/python bench/run.py [PART ...]

runs only those parts (mqtt, outbox, ota_verify, device, ota, board_model, app, mcu) and
merges only their figures, e.g. `QUICK=1 .venv/bin/python bench/run.py ota_verify`."""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testbed.broker import Mosquitto  # noqa: E402
from testbed.devices import micropython_path  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results.json")
TARGETS = {
    "qos1_pipelined_msg_s": ">= 5000",
    "qos1_pipelined_vs_qos0": ">= 0.4",
    "qos1_awaited_msg_s": ">= 1000",
    "client_heap_bytes": "<= 16384",
    "queue_flash_bytes_per_payload_byte": "<= 2.0",
    "queue_recovery_full_ms": "< 1000",
    "boot_to_first_publish_ms": "< 500",
    "soak_memory_errors": "0",
    "boot_min_heap_kb": "<= 128: missed",
    "board_model_heap_held_bytes": "<= 40960",
    "board_model_tls_heap_held_bytes": "<= 69632",
    "board_model_tls_soak_memory_errors": "0 (96 KiB heap)",
    "ota_verify_ms": "< 1000",
    "ota_verify_ms_low_heap": "< 1000",
    "board_model_ota_verify_ms": "< 1000",
    "board_model_ota_verify_ms_low_heap": "< 1000",
    "ota_download_heap_bytes": "<= 12288",
    "board_model_ota_download_heap_bytes": "<= 12288",
    "mcu_m0_peers_ratio": "qos0 vs umqtt.simple <= 1; qos1 vs mqtt_as <= 0.5",
    "mcu_rv32_peers_ratio": "qos0 vs umqtt.simple <= 1; qos1 vs mqtt_as <= 0.5",
    "duty_round_trips_per_wake": "<= 2 (CONNACK, PUBACKs)",
}


def run_bench(script, broker, n):
    r = subprocess.run(
        [micropython_path(), os.path.join(ROOT, "bench", script),
         broker.host, str(broker.port), str(n)],
        capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0:
        raise SystemExit("%s failed:\n%s%s" % (script, r.stdout, r.stderr))
    return json.loads(r.stdout.strip().splitlines()[-1])


# The heap ota_verify.py bisects a verify's free heap in: a board's, as testbed/sim.py gives
# each. The collector scans the whole live heap each time it runs, and a verify short of heap
# runs it often: in the Unix port's default 2 MB, nearly all of it ballast then, the time
# would be mostly scanning the ballast (with 8 KB free: 470 ms, against 12 ms in 2 MB free).
OTA_VERIFY_HEAP = "96K"


def run_ota_verify(quick, binary=None):
    """bench/ota_verify.py (MicroPython, no broker): median ms of one P-256 signature check."""
    r = subprocess.run([binary or micropython_path(), os.path.join(ROOT, "bench",
                                                                   "ota_verify.py"),
                        "21" if quick else "101"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit("ota_verify.py failed:\n%s%s" % (r.stdout, r.stderr))
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_ota_verify_heap(quick, binary=None):
    """bench/ota_verify.py heap in an OTA_VERIFY_HEAP heap: ota_verify_heap_min_bytes, the
    smallest free heap (gc.mem_free()) in which a verify succeeds in every layout tried, and
    ota_verify_ms_low_heap, the median time of one there. Its progress (the time with the
    whole heap free and at a few heaps between) goes to the terminal."""
    r = subprocess.run([binary or micropython_path(), "-X", "heapsize=" + OTA_VERIFY_HEAP,
                        os.path.join(ROOT, "bench", "ota_verify.py"), "heap",
                        "7" if quick else "21", "32" if quick else "128"],
                       stdout=subprocess.PIPE, text=True, timeout=3600)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise SystemExit("ota_verify.py heap failed:\n%s" % r.stdout)
    return json.loads(lines[-1])


def run_script(name, quick, args=(), timeout=1500):
    """bench/NAME (CPython): its progress goes straight to the terminal, its figures are the
    last line of its output."""
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", name), *args],
        stdout=subprocess.PIPE, text=True, timeout=timeout,
        env=dict(os.environ, QUICK="1" if quick else ""),
    )
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise SystemExit("%s failed:\n%s" % (name, r.stdout))
    return json.loads(lines[-1])


def run_device_bench(quick):
    """bench/device_bench.py: boot to first publish, the memory soak through testbed/sim.py."""
    return run_script("device_bench.py", quick)


def run_ota_bench(quick, binaries):
    """bench/ota_bench.py: an OTA download's time, flash writes and added heap; the heap on
    the board model's plain build too (binaries[1]) when it exists."""
    return run_script("ota_bench.py", quick, [binaries[1] if binaries else "none"])


def board_model_binaries():
    """(frozen, plain) binaries of `make board-model`: BOARD_MODEL=PATH or
    build/board-model/micropython, and build/board-model-plain/micropython beside it; or
    None and why not."""
    path = os.environ.get("BOARD_MODEL") or os.path.join("build", "board-model", "micropython")
    if not os.path.exists(os.path.join(ROOT, path)):
        return None, ("no %s (make board-model MPY_DIR=/path/to/micropython builds it; "
                      "BOARD_MODEL=PATH names another)" % path)
    path = os.path.join(ROOT, path)  # unless it was absolute
    plain = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))),
                         "board-model-plain", "micropython")
    return (path, plain), None


def run_board_model_bench(quick, binaries):
    """bench/board_model_bench.py: the board-model figures (README "Board-model build")."""
    return run_script("board_model_bench.py", quick, binaries, timeout=3600)


def run_app_bench(quick, binaries):
    """bench/app_bench.py: held heap on the board model without an app, with an empty one
    (app_api_heap_bytes) and with each example (app_example_heap_bytes)."""
    return run_script("app_bench.py", quick, binaries[:1], timeout=3600)


def run_mcu_bench(quick):
    """bench/mcu_bench.py: instruction counts under QEMU on the builds of `make mcu`; None
    and why not when there are none (or no QEMU)."""
    figures = run_script("mcu_bench.py", quick, timeout=7200)
    why = figures.pop("mcu_skipped", None)
    return (None, why) if why else (figures, None)


def run_board_model_ota_verify(quick, binaries):
    """ota_verify.py's figures on the board model (32-bit: other GC blocks, other bignum
    digits), prefixed board_model_."""
    figures = run_ota_verify(quick, binaries[0])
    figures.update(run_ota_verify_heap(quick, binaries[0]))
    return {"board_model_" + k: v for k, v in figures.items()}


def run_duty_bench(quick, binaries):
    """bench/duty_bench.py: a battery board's wakes (README "Battery devices"); on the board
    model too (binaries[0], frozen firmware: imports as a board's), prefixed board_model_."""
    figures = run_script("duty_bench.py", quick)
    if binaries:
        bm = run_script("duty_bench.py", quick, ["--micropython", binaries[0]])
        figures["board_model_duty_awake_ms"] = bm["duty_awake_ms"]
    return figures


PARTS = ("mqtt", "outbox", "ota_verify", "device", "ota", "board_model", "app", "mcu", "duty")


# Figures each part exists to produce: None or absent fails the run (missing_figures).
REQUIRED = {
    "mqtt": ("qos1_pipelined_msg_s",),
    "outbox": ("queue_recovery_full_ms", "outbox_flash_bytes_per_hour_offline",
               "outbox_flash_erases_per_hour_offline"),
    "ota_verify": ("ota_verify_ms",),
    "device": ("boot_to_first_publish_ms", "boot_min_heap_kb", "soak_telemetry",
               "soak_heap_samples"),
    "ota": ("ota_download_heap_bytes",),
    "duty": ("duty_awake_ms", "duty_round_trips_per_wake", "duty_bytes_per_wake"),
}


def missing_figures(parts, figures):
    """What the parts run should have produced and did not: a figure None or absent, or a
    soak with no telemetry or no heap sample (its devices never ran)."""
    out = []
    for part in sorted(parts):
        for k in REQUIRED.get(part, ()):
            if figures.get(k) is None:
                out.append("%s (part %s)" % (k, part))
    for k in ("soak_telemetry", "soak_heap_samples"):
        if k in figures and figures[k] == 0:
            out.append("%s is 0: the soak's device never published" % k)
    return out


def main(argv=None):
    parts = sys.argv[1:] if argv is None else argv
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit("unknown part %s: the parts are %s" % (", ".join(bad), " ".join(PARTS)))
    parts = set(parts or PARTS)
    quick = os.environ.get("QUICK") == "1"
    n = 2000 if quick else 10000
    figures = {}
    if parts & {"mqtt", "outbox"}:
        with tempfile.TemporaryDirectory() as tmp:
            with Mosquitto(tmp, persistence=False) as broker:
                if "mqtt" in parts:
                    figures.update(run_bench("mqtt_bench.py", broker, n))
                if "outbox" in parts:
                    figures.update(run_bench("outbox_bench.py", broker, n // 2))
    binaries, why = board_model_binaries()
    if "ota_verify" in parts:
        figures.update(run_ota_verify(quick))
        figures.update(run_ota_verify_heap(quick))
        if binaries:
            figures.update(run_board_model_ota_verify(quick, binaries))
        else:
            print("board_model_ota_verify_* skipped: %s" % why, flush=True)
    if "device" in parts:
        figures.update(run_device_bench(quick))
    if "ota" in parts:
        figures.update(run_ota_bench(quick, binaries))
    if "board_model" in parts:
        if binaries:
            figures.update(run_board_model_bench(quick, binaries))
        else:
            print("board model figures skipped: %s" % why, flush=True)
    if "app" in parts:
        if binaries:
            figures.update(run_app_bench(quick, binaries))
        else:
            print("app figures skipped: %s" % why, flush=True)
    if "duty" in parts:
        figures.update(run_duty_bench(quick, binaries))
    if "mcu" in parts:
        got, why_not = run_mcu_bench(quick)
        if got:
            figures.update(got)
        else:
            print("mcu figures skipped: %s" % why_not, flush=True)
    missing = missing_figures(parts, figures)
    if missing:
        # A part that produced no figure (or a run with no telemetry) measured nothing: it
        # must not pass as a result, nor overwrite the last good one.
        raise SystemExit("bench: not written, figures missing: %s" % "; ".join(missing))
    results = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            results = json.load(f)
    results.update(figures)
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    print("%-34s %14s  %s" % ("figure", "value", "target"))
    for k in sorted(figures):
        print("%-34s %14s  %s" % (k, figures[k], TARGETS.get(k, "")))
    print("written to %s" % os.path.relpath(RESULTS, ROOT))


if __name__ == "__main__":
    main()
