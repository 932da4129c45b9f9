"""Board-model figures, host side (CPython), run by bench/run.py when `make board-model` has
built the 32-bit Unix port (build/board-model/micropython, or BOARD_MODEL=PATH): heap as a
board holds it, with and without mutual TLS. Prints progress on stderr and one JSON line of
figures on stdout; the held-heap breakdown goes to bench/board_model_heap.json.

board_model_min_heap_kb: the smallest heap (bisected in 4 KiB steps) in which the firmware
frozen into the 32-bit build boots, connects, survives a broker outage with no MemoryError
(a probe of about 15 s), and then soaks in it (2 min, QUICK=1: 30 s, an outage every
quarter of it; while the soak fails, again with 4, 8, 16, then 32 KiB more). board_model_tls_min_heap_kb: the same with mutual TLS to a local
mosquitto (EC P-256 certificates made here with openssl). board_model_mpy_min_heap_kb: the
same without TLS on build/board-model-plain/micropython (only asyncio frozen) running the
.mpy files of `make mpy` from build/.

board_model_heap_held_bytes, board_model_max_free_block_bytes: the largest heap_alloc and
the smallest heap_largest_free of the device's health messages (both measured after a
gc.collect() on the device) in a soak in a 96 KiB heap with outages (5 min; QUICK=1: 1 min).
board_model_tls_*: the same soak with mutual TLS, 10 min (QUICK=1: 90 s), an outage every
60 s for 10 s: held heap, memory errors (output lines with a MemoryError or an mbedTLS ENOMEM,
OSError 12), the least-squares slope of heap_alloc after the first outage. The targets
(issues 17, 27): held <= 40 KiB without TLS, <= 68 KiB with, the TLS soak passing in 96 KiB;
board_model_heap_unix_board_bytes is what of it only the Unix stand-in pays.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from firmware.bootconfig import validate  # noqa: E402
from testbed.broker import Mosquitto, free_port  # noqa: E402
from testbed.devices import DeviceProcess, Spec, binary_info, device_config  # noqa: E402
from testbed.observer import Observer  # noqa: E402
from testbed.proxy import FaultProxy  # noqa: E402
from testbed.sim import build_mpy, slope_per_hour  # noqa: E402

HEAP_JSON = os.path.join(ROOT, "bench", "board_model_heap.json")
SOAK_HEAP_KB = 96
STEP_KB = 4
SEARCH_KB = (16, 256)  # fails at the first, must boot at the second
# Fast reconnects for the probes, so one outage costs seconds, not the default backoff.
QUICK_RECONNECT = {"base": 0.5, "cap": 2, "first_window": 0.5}


def say(msg):
    print("board_model_bench: " + msg, file=sys.stderr, flush=True)


def _ssl(d, *args):
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


def make_pki(d):
    """A CA, a broker certificate for localhost/127.0.0.1 and a device certificate (EC
    P-256, as tests/host/test_tls.py makes them); the device's files in DER."""
    _ssl(d, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    _ssl(d, "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=bench-ca", "-days", "2",
         "-out", "ca.pem")
    _ssl(d, "x509", "-in", "ca.pem", "-outform", "DER", "-out", "ca.der")
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                      ("device", "basicConstraints=CA:FALSE")):
        _ssl(d, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", name + ".key")
        _ssl(d, "req", "-new", "-key", name + ".key", "-subj", "/CN=" + name, "-out",
             name + ".csr")
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write(ext + "\n")
        _ssl(d, "x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", name + ".ext", "-out", name + ".pem")
        _ssl(d, "x509", "-in", name + ".pem", "-outform", "DER", "-out", name + ".der")
        _ssl(d, "ec", "-in", name + ".key", "-outform", "DER", "-out", name + ".key.der")
    return d


def memory_errors(output):
    """Output lines that report running out of heap: a MemoryError, or mbedTLS failing to
    allocate (OSError 12, ENOMEM: with mbedTLS in the GC heap, a TLS connect that finds no
    room for its buffers)."""
    return sum(1 for line in output.splitlines()
               if "MemoryError" in line or "OSError(12," in line)


class Bench:
    """One mosquitto with a plain listener (the observer's) and a mutual-TLS one; a fault
    proxy in front of each for the devices."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.pki = os.path.join(tmp, "pki")
        os.makedirs(self.pki)
        make_pki(self.pki)
        self.mtls_port = free_port()
        conf = ("listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\n"
                "require_certificate true\n" % (
                    self.mtls_port, os.path.join(self.pki, "ca.pem"),
                    os.path.join(self.pki, "server.pem"), os.path.join(self.pki, "server.key")))
        self.broker = Mosquitto(os.path.join(tmp, "broker"), extra_conf=conf,
                                persistence=False).start()
        self.proxy = FaultProxy(self.broker.host, self.broker.port, record=False).start()
        self.tls_proxy = FaultProxy(self.broker.host, self.mtls_port, record=False).start()
        self.n = 0

    def close(self):
        self.proxy.stop()
        self.tls_proxy.stop()
        self.broker.stop()

    def config(self, device_id, tls, **over):
        proxy = self.tls_proxy if tls else self.proxy
        broker = dict(over.pop("broker", {}), port=proxy.port)
        if tls:
            broker["tls"] = {"ca": "/ca.der", "cert": "/device.der", "key": "/device.key.der",
                             "server_hostname": "localhost"}
        cfg = device_config(device_id, proxy.host, proxy.port, broker=broker, **over)
        validate(json.loads(json.dumps(cfg)))  # the firmware's own checks, before a run
        files = {}
        if tls:
            for f in ("ca.der", "device.der", "device.key.der"):
                files["/" + f] = os.path.join(self.pki, f)
        return cfg, files

    def run(self, binary, heap_kb, tls, seconds, outage_every=None, outage_for=None,
            health=1.0, telemetry=1.0, reconnect=None, main=None, probe=False):
        """One device for `seconds` (after it first connected), outages through its proxy;
        returns what it did: ok, memory_errors, health samples, ..."""
        self.n += 1
        dev = "bm-%03d" % self.n
        over = {"telemetry_interval": telemetry, "health_interval": health}
        if reconnect:
            over["broker"] = {"reconnect": reconnect}
        cfg, files = self.config(dev, tls, **over)
        proxy = self.tls_proxy if tls else self.proxy
        samples = []  # (t since connected, heap_alloc, heap_largest_free)
        t0 = [None]
        lock = threading.Lock()

        def on_msg(t, topic, payload, retain):
            if topic.endswith("/health") and t0[0] is not None:
                try:
                    m = json.loads(payload)
                    with lock:
                        samples.append((t - t0[0], m["heap_alloc"], m.get("heap_largest_free")))
                except (ValueError, KeyError):
                    pass

        obs = Observer(self.broker.host, self.broker.port, topics=("devices/%s/health" % dev,),
                       on_message=on_msg, record=False)
        image = os.path.join(self.tmp, dev + ".img")
        p = DeviceProcess([Spec(image, config=cfg, files=files)], self.tmp,
                          heapsize="%dk" % heap_kb, micropython=binary, main=main)
        p.start()
        outages = []
        try:
            try:
                p.wait_line(r" I connected", 20)
            except AssertionError:
                return {"ok": False, "why": "never connected",
                        "memory_errors": memory_errors(p.output()),
                        "samples": [], "outages": [], "connects": 0, "output": p.output()}
            t0[0] = time.monotonic()
            end = t0[0] + seconds
            next_cut = t0[0] + outage_every if outage_every else None
            while time.monotonic() < end and p.alive():
                now = time.monotonic()
                if next_cut and now >= next_cut and now + outage_for < end:
                    proxy.refuse(True)
                    proxy.cut()
                    time.sleep(outage_for)
                    proxy.refuse(False)
                    outages.append(time.monotonic() - t0[0])
                    next_cut += outage_every
                    continue
                time.sleep(0.2)
            out = p.output()
            connects = out.count(" I connected")
            errors = memory_errors(out)
            ok = (p.alive() and not p.resets and not errors and "Traceback" not in out
                  and connects >= 1 + (1 if outages else 0))
            why = "" if ok else ("process died" if not p.alive() else
                                 "watchdog reset" if p.resets else
                                 "out of memory" if errors else
                                 "traceback" if "Traceback" in out else
                                 "no reconnect after the outage")
        finally:
            p.kill()
            obs.close()
            proxy.refuse(False)
        with lock:
            hs = list(samples)
        return {"ok": ok, "why": why, "memory_errors": errors, "samples": hs,
                "outages": outages, "connects": connects, "output": out}

    def probe(self, binary, heap_kb, tls, main=None):
        """Boots, connects, an outage of 2 s, reconnects, runs on: about 15 s."""
        return self.run(binary, heap_kb, tls, 11, outage_every=3, outage_for=2, health=1,
                        telemetry=0.2, reconnect=QUICK_RECONNECT, main=main)

    def min_heap_kb(self, what, binary, tls, confirm_s, main=None):
        """Bisect the smallest heap that passes the probe, then confirm it with a soak of
        confirm_s (outages, health); 4 KiB more and again while the soak fails."""
        lo, hi = SEARCH_KB
        r = self.probe(binary, hi, tls, main)
        if not r["ok"]:
            say("%s: fails even at %dk (%s):\n%s" % (what, hi, r["why"], r["output"][-2000:]))
            return None
        while hi - lo > STEP_KB:
            mid = (lo + hi) // 2 // STEP_KB * STEP_KB
            r = self.probe(binary, mid, tls, main)
            say("%s: probe at %dk: %s" % (what, mid, "ok" if r["ok"] else r["why"]))
            if r["ok"]:
                hi = mid
            else:
                lo = mid
        step = STEP_KB
        while hi <= SEARCH_KB[1]:
            every = max(10.0, confirm_s / 4)
            r = self.run(binary, hi, tls, confirm_s, outage_every=every, outage_for=every / 4,
                         health=2, telemetry=1, main=main)
            say("%s: %.0f s soak at %dk: %s" % (what, confirm_s, hi, "ok" if r["ok"] else r["why"]))
            if r["ok"]:
                return hi
            hi += step
            step = min(2 * step, 32)  # 4, 8, 16, 32, 32, ... KiB: coarser as it misses
        return None

    def soak(self, binary, tls, seconds, every, length, health):
        r = self.run(binary, SOAK_HEAP_KB, tls, seconds, outage_every=every,
                     outage_for=length, health=health, telemetry=1)
        hs = r["samples"]
        first_end = r["outages"][0] if r["outages"] else 0
        slope = slope_per_hour([(t, a) for t, a, _ in hs if t >= first_end])
        free = [f for _, _, f in hs if f is not None]
        if r["memory_errors"] or not r["ok"]:
            say("soak (%s): %s; the device's last output:\n%s"
                % ("TLS" if tls else "plain", r["why"], r["output"][-3000:]))
        return {
            "held": max(a for _, a, _ in hs) if hs else None,
            "held_min": min(a for _, a, _ in hs) if hs else None,
            "free_block": min(free) if free else None,
            "memory_errors": r["memory_errors"],
            "slope": round(slope, 1) if slope is not None else None,
            "samples": len(hs),
            "outages": len(r["outages"]),
            "reconnects": max(0, r["connects"] - 1),
            "ok": r["ok"],
        }


def breakdown(bench, binary, tls, run_s=8):
    """bench/heap_breakdown.py on the frozen build, from a directory of its own."""
    run = os.path.join(bench.tmp, "breakdown-%s" % ("tls" if tls else "plain"))
    os.makedirs(run)
    shutil.copy(os.path.join(ROOT, "bench", "heap_breakdown.py"), run)
    cfg, files = bench.config("hb-%s" % ("tls" if tls else "plain"), tls, telemetry_interval=1,
                              health_interval=5)
    cfg_path = os.path.join(run, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    args = [binary, "-X", "heapsize=%dk" % SOAK_HEAP_KB, os.path.join(run, "heap_breakdown.py"),
            str(run_s), "--flash", os.path.join(run, "flash.img"), "--put",
            "/config.json=" + cfg_path]
    for dest, src in files.items():
        args += ["--put", "%s=%s" % (dest, src)]
    r = subprocess.run(args, cwd=run, capture_output=True, text=True, timeout=120)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines or not lines[-1].startswith("{"):
        say("heap breakdown (%s) failed (rc %s):\n%s%s"
            % ("TLS" if tls else "plain", r.returncode, r.stdout[-2000:], r.stderr[-2000:]))
        return None
    return json.loads(lines[-1])


def print_breakdown(name, b):
    say("held heap, %s (bytes after gc.collect(), frozen 32-bit build):" % name)
    say("  %7d  interpreter and the script's own bytecode (main.py's, on a board)" % b["start"])
    say("  %7d  main.py's boot reserve (released into the boot buffers)" % b["reserve"])
    mods = sorted(b["modules"], key=lambda m: -m[1])
    say("  %7d  modules (module dicts, functions, classes; bytecode stays frozen):"
        % sum(m[1] for m in mods))
    for names, n in mods:
        say("    %6d  %s" % (n, names))
    say("  %7d  the import hook's records and conservative-GC noise (not the device's)"
        % (b["imports"] - sum(m[1] for m in mods)))
    for what, n in b["steps"]:
        say("  %+7d  %s" % (n, what))
    say("  %7d  of it the Unix board's own (its module, flash file, control file, simulated "
        "link; a board pays ~640 for its littlefs mount before main.py instead)" % b["unix_board"])
    say("  buffers allocated at boot: %s" % ", ".join(
        "%s %d" % kv for kv in sorted(b["buffers"].items(), key=lambda kv: -kv[1])))
    say("  %7d  held in all" % b["held"])


def soak_figures(prefix, s):
    """The keys a soak gives, without or with TLS (prefix board_model_ / board_model_tls_)."""
    return {prefix + "heap_held_bytes": s["held"],
            prefix + "max_free_block_bytes": s["free_block"],
            prefix + "soak_memory_errors": s["memory_errors"]}


def main():
    quick = os.environ.get("QUICK") == "1"
    binary = os.path.abspath(sys.argv[1])
    plain = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else None
    info = binary_info(binary)
    figures = {"board_model_binary": os.path.relpath(binary, ROOT),
               "board_model_build": "%s; %d-bit%s%s" % (
                   info["version"], info["bits"], ", firmware frozen" if info["frozen"] else "",
                   ", TLS" if info["tls"] else ", no TLS")}
    if not info["frozen"]:
        raise SystemExit("%s has no firmware frozen in (make board-model builds one)" % binary)
    confirm_s = 30 if quick else 120
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(tmp)
        try:
            heap = {}
            b = breakdown(bench, binary, False)
            if b:
                print_breakdown("no TLS", b)
                heap["plain"] = b
            if info["tls"]:
                b = breakdown(bench, binary, True)
                if b:
                    print_breakdown("mutual TLS", b)
                    heap["tls"] = b
            if "plain" in heap:
                figures["board_model_heap_unix_board_bytes"] = heap["plain"]["unix_board"]
            if heap:
                with open(HEAP_JSON, "w") as f:
                    json.dump(heap, f, indent=1, sort_keys=True)
                    f.write("\n")
            figures["board_model_min_heap_kb"] = bench.min_heap_kb(
                "frozen", binary, False, confirm_s)
            s = bench.soak(binary, False, 60 if quick else 300, 20 if quick else 60,
                           5 if quick else 10, 2 if quick else 5)
            figures.update(soak_figures("board_model_", s))
            say("soak in %dk, no TLS: %s" % (SOAK_HEAP_KB, s))
            if info["tls"]:
                figures["board_model_tls_min_heap_kb"] = bench.min_heap_kb(
                    "frozen, mutual TLS", binary, True, confirm_s)
                s = bench.soak(binary, True, 90 if quick else 600, 20 if quick else 60,
                               5 if quick else 10, 2 if quick else 5)
                figures.update(soak_figures("board_model_tls_", s))
                figures.update({
                    "board_model_tls_soak_heap_slope_bytes_per_hour": s["slope"],
                    "board_model_tls_soak_duration_s": 90.0 if quick else 600.0,
                    "board_model_tls_soak_outages": s["outages"],
                    "board_model_tls_soak_reconnects": s["reconnects"],
                })
                say("soak in %dk, mutual TLS: %s" % (SOAK_HEAP_KB, s))
            else:
                say("TLS figures skipped: %s was built without TLS (no lib/mbedtls)" % binary)
            if plain and os.path.exists(plain):
                main_py, n = build_mpy()
                say("build/: %d .mpy files for %s" % (n, plain))
                figures["board_model_mpy_min_heap_kb"] = bench.min_heap_kb(
                    ".mpy", plain, False, confirm_s, main=main_py)
            else:
                say("board_model_mpy_min_heap_kb skipped: no %s" % plain)
        finally:
            bench.close()
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
