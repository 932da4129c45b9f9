"""A staged over-the-air rollout to a simulated fleet, end to end (host-side, CPython).

    python testbed/ota_demo.py [--devices 20] [--window 20] [--workdir DIR] [--timeout 300]
                             [--keep] [--verbose]

Starts a private mosquitto (testbed/broker.py), an HTTP file server for the bundles
(testbed/fileserver.py), a signing key pair and a second, untrusted one (tools/bundle.keygen,
in the workdir: never the git tree), and builds three signed bundles:
    v2 "2.0.0"  this checkout, signed by the trusted key;
    v3 "3.0.0"  a copy whose firmware/run.py raises RuntimeError at import (a boot loop);
    v4 "4.0.0"  this checkout, signed by the untrusted key.
Then N devices (the real firmware on the Unix port, one process each, powered up again when
they crash) start on the factory image (this checkout, "0.1.0") with the trusted key in
ota.keys, and the operator's side rolls the versions out one after the other, each as a
retained layer on fleet/all/config/desired (layer versions 1, 2, 3) with window_s W:
    v2: every device downloads within W, switches within W and confirms itself;
    v3: every device switches, crashes at boot 3 times and rolls back to 2.0.0;
    v4: every device refuses it (not signed by a trusted key).
Each phase waits for every device's retained state on devices/{id}/ota (or --timeout s).

A consumer with a kept session (fixed client id, clean session off, as testbed/sim.py's)
counts telemetry gaps with testbed/ledger.py's rule across all the reboots. At the end it
prints one JSON line: {"devices", "confirmed", "rolled_back", "refused", "gaps",
"download_start_spread_s", "max_concurrent_downloads", "rollback_reasons", "refusal_reasons",
"boot_numbers_carried", "fw_after", "phase_s", "seconds", "telemetry", "duplicates",
"process_exits", "watchdog_resets", "memory_errors", ...}; exit code 0 only if every device
confirmed v2, rolled back v3, refused v4, and no telemetry was lost.

download_start_spread_s is max - min over the devices of the time of each one's first GET
of v2's manifest.json, from the file server's request log; a request is put down to its
device by the socket (Linux /proc: which device process holds the connection's other end).
max_concurrent_downloads is the file server's concurrent_max (bodies in flight) during v2.

Progress goes to stderr, the JSON line alone to stdout. Each device's output is written to
WORKDIR/DEVICE.log; the default workdir (a temp dir) is removed after a run that passed,
kept after one that failed (or with --keep).
"""
import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from firmware.bootconfig import validate  # noqa: E402
from tools import bundle  # noqa: E402
from testbed.broker import Mosquitto  # noqa: E402
from testbed.devices import ROOT, DeviceProcess, Spec, device_config, error_counts  # noqa: E402
from testbed.fileserver import FileServer  # noqa: E402
from testbed.ledger import Ledger  # noqa: E402
from testbed.observer import Observer  # noqa: E402

# Fast reconnects (tests/host/test_ota.py's FAST): every update reboots the whole fleet.
BROKER = {"keepalive": 5, "reconnect": {"first_window": 0.5, "base": 0.2, "cap": 1}}
CONFIRM_S = 60
TELEMETRY_S = 1.0
LAYER = "fleet/all/config/desired"
FLUSH = "ota-demo/flush"  # the consumer's own marker: everything before it has arrived
CONSUMER_RECONNECT = (0.2, 1.0)
UP_TIMEOUT_S = 120.0  # the factory fleet's first boot


def log(msg):
    sys.stderr.write("ota-demo: %s\n" % msg)
    sys.stderr.flush()


# ---- which device made a request ---------------------------------------------------------


def _socket_inode(local_port, remote_port):
    """Inode of the IPv4 TCP socket 127.0.0.1:local_port -> :remote_port, or None."""
    want = (":%04X" % local_port, ":%04X" % remote_port)
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                p = line.split()
                if p[1].endswith(want[0]) and p[2].endswith(want[1]) and p[9] != "0":
                    return p[9]  # (inode 0: a closed one in TIME_WAIT)
    except OSError:
        pass
    return None


def _holder(inode, pids):
    """Which of pids {pid: name} has the socket `inode` open, or None."""
    target = "socket:[%s]" % inode
    for pid, name in pids.items():
        d = "/proc/%d/fd" % pid
        try:
            fds = os.listdir(d)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(d, fd)) == target:
                    return name
            except OSError:
                pass
    return None


class DemoFileServer(FileServer):
    """The file server, with each manifest.json request put down to the device whose
    process holds the other end of its connection (`entry["device"]`). The lookup runs as
    the request is logged, while the device still waits for its answer."""

    def __init__(self, root, pids):
        super().__init__(root)
        self.pids = pids  # fn() -> {pid: device id}

    def log(self, entry):
        if entry["path"].endswith("/manifest.json"):
            inode = _socket_inode(entry["client"], self.port)
            entry["device"] = _holder(inode, self.pids()) if inode else None
        super().log(entry)


# ---- the fleet's side, as the consumer sees it -----------------------------------------


class Fleet:
    """What the consumer heard: telemetry into a Ledger, births and OTA states per device."""

    def __init__(self, ids):
        self.ids = ids
        self.ledger = Ledger()
        self.births = {d: [] for d in ids}  # (t, boot, fw, cause)
        self.ota = {d: [] for d in ids}  # (t, state document)
        self.flushed = set()
        self.cond = threading.Condition()

    def on_message(self, t, topic, payload, retain):
        if topic == FLUSH:
            with self.cond:
                self.flushed.add(payload.decode())
                self.cond.notify_all()
            return
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != "devices" or parts[1] not in self.births:
            return
        dev, kind = parts[1], parts[2]
        try:
            msg = json.loads(payload)
        except ValueError:
            log("non-JSON on %s" % topic)
            return
        with self.cond:
            if kind == "telemetry" and isinstance(msg.get("seq"), int):
                self.ledger.telemetry(dev, msg, t)
            elif kind == "status":
                self.ledger.status[dev] = msg
                if msg.get("state") == "online":
                    self.births[dev].append((t, msg.get("boot"), msg.get("fw"), msg.get("cause")))
            elif kind == "ota":
                self.ota[dev].append((t, msg))
            self.cond.notify_all()

    def wait(self, done, timeout):
        """Block until done() (called under the lock) is true; False on the timeout."""
        end = time.monotonic() + timeout
        with self.cond:
            while not done():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 1.0))
        return True

    def states(self, dev, version):
        return [m for _, m in self.ota[dev] if m.get("version") == version]

    def has(self, dev, version, state, **match):
        return any(m.get("state") == state and all(m.get(k) == v for k, v in match.items())
                   for m in self.states(dev, version))


def boots_carried(births):
    """Every boot number at least the one before (a birth sent twice repeats its own), and
    each update's reboot a new one: the first 2.0.0 boot after the last 0.1.0 one, and the
    boot after v3's rollback (the last birth) after that."""
    boots = [b[1] for b in births]
    if not boots or any(not isinstance(b, int) for b in boots):
        return False
    if any(a > b for a, b in zip(boots, boots[1:])):
        return False
    v1 = [b[1] for b in births if b[2] == "0.1.0"]
    v2 = [b[1] for b in births if b[2] == "2.0.0"]
    return bool(v1 and v2) and max(v1) < v2[0] < births[-1][1] and births[-1][2] == "2.0.0"


# ---- the run -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=20, help="number of devices (default 20)")
    p.add_argument("--window", type=float, default=20.0,
                   help="window_s of each rollout: downloads and switches spread over it "
                        "(default 20)")
    p.add_argument("--workdir", help="keys, bundles, flash images, logs (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="longest wait for each phase, in s (default 300)")
    p.add_argument("--keep", action="store_true", help="keep the default temp workdir")
    p.add_argument("--verbose", action="store_true", help="echo the devices' output")
    a = p.parse_args(argv)
    if a.devices < 1:
        p.error("--devices must be at least 1")
    if not 0 <= a.window <= 604800:
        p.error("--window must be in 0..604800 (ota.window_s)")
    if a.timeout <= 0:
        p.error("--timeout must be positive")
    return a


def v3_source(workdir):
    """A copy of firmware/ and lib/ whose firmware/run.py raises at import."""
    src = os.path.join(workdir, "src-v3")
    shutil.rmtree(src, ignore_errors=True)
    for d in ("firmware", "lib"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(src, d),
                        ignore=shutil.ignore_patterns("__pycache__"))
    with open(os.path.join(src, "firmware", "run.py"), "a") as f:
        f.write('\n\nraise RuntimeError("v3 crashes at boot")\n')
    return src


def releases(workdir, srv):
    """Keys and the three signed bundles; returns (trusted public key, {version: request})."""
    keys = os.path.join(workdir, "keys")
    pub, _ = bundle.keygen("fleet", keys)
    bundle.keygen("wrong", keys)
    out = {}
    for version, src, key in ((2, None, "fleet"), (3, v3_source(workdir), "fleet"),
                              (4, None, "wrong")):
        d = os.path.join(srv.root, "v%d" % version)
        bundle.build(d, version, name="%d.0.0" % version, src=src)
        sha = bundle.sign(d, os.path.join(keys, key + ".pem"))
        out[version] = {"version": version, "url": "%sv%d/" % (srv.url, version),
                        "manifest_sha256": sha}
    return pub, out


def first_requests(requests, path):
    """{device: time of its first request for `path`} (None: not put down to a device)."""
    first = {}
    for e in requests:
        if e["path"] == path:
            dev = e.get("device")
            if dev not in first or e["t"] < first[dev]:
                first[dev] = e["t"]
    return first


def run(a):
    """The demo; returns (summary, ok)."""
    t_start = time.monotonic()
    workdir = a.workdir
    os.makedirs(workdir, exist_ok=True)
    ids = ["ota-%03d" % n for n in range(a.devices)]
    procs = {}  # device id -> DeviceProcess
    broker = srv = obs = None
    fleet = Fleet(ids)
    summary = {"devices": a.devices}
    ok = False
    try:
        broker = Mosquitto(os.path.join(workdir, "broker")).start()
        log("mosquitto on %s:%d, workdir %s" % (broker.host, broker.port, workdir))

        def pids():
            return {p.proc.pid: d for d, p in list(procs.items()) if p.proc is not None}

        os.makedirs(os.path.join(workdir, "srv"), exist_ok=True)
        srv = DemoFileServer(os.path.join(workdir, "srv"), pids).start()
        t = time.monotonic()
        pub, req = releases(workdir, srv)
        log("bundles v2, v3 (crashes at boot), v4 (untrusted key) built and signed in "
            "%.1f s, served at %s" % (time.monotonic() - t, srv.url))

        obs = Observer(
            broker.host, broker.port,
            topics=("devices/+/telemetry", "devices/+/status", "devices/+/ota", FLUSH),
            on_message=fleet.on_message,
            client_id="ota-demo-%d-%06x" % (os.getpid(), random.getrandbits(24)),
            clean=False, reconnect=CONSUMER_RECONNECT, keepalive=10, record=False)

        t = time.monotonic()
        for dev in ids:
            cfg = device_config(dev, broker.host, broker.port, broker=BROKER,
                                telemetry_interval=TELEMETRY_S,
                                ota={"keys": [pub], "confirm_s": CONFIRM_S})
            validate(cfg)
            echo = (lambda line, dev=dev: log("%s: %s" % (dev, line))) if a.verbose else None
            spec = Spec(os.path.join(workdir, dev + ".img"), config=cfg)
            procs[dev] = DeviceProcess([spec], workdir, restart=True, echo=echo).start()

        up = fleet.wait(lambda: all(any(b[2] == "0.1.0" for b in fleet.births[d]) for d in ids),
                        UP_TIMEOUT_S)
        with fleet.cond:
            n_up = sum(1 for d in ids if fleet.births[d])
        log("%d of %d devices online on 0.1.0 in %.1f s" % (n_up, a.devices, time.monotonic() - t))
        phases = [
            # version, expected (state, extra fields), states that end a device's wait
            (2, ("confirmed", {}), ("failed", "rolled_back")),
            (3, ("rolled_back", {}), ("failed", "confirmed")),
            (4, ("failed", {"refused": True}), ("confirmed", "rolled_back", "staged")),
        ]
        passed = up
        summary["phase_s"] = {}
        for layer, (version, (state, match), wrong) in enumerate(phases, 1):
            if not passed:
                break
            doc = {"version": layer, "ota": dict(req[version], window_s=a.window)}
            t = time.monotonic()
            obs.publish(LAYER, json.dumps(doc), retain=True)
            log("v%d requested (layer %d, window %g s): waiting for %s on every device"
                % (version, layer, a.window, state))

            def settled(version=version, state=state, match=match, wrong=wrong):
                return all(fleet.has(d, version, state, **match)
                           or any(fleet.has(d, version, w) for w in wrong) for d in ids)

            fleet.wait(settled, a.timeout)
            dt = time.monotonic() - t
            summary["phase_s"]["v%d" % version] = round(dt, 1)
            with fleet.cond:
                good = [d for d in ids if fleet.has(d, version, state, **match)]
                bad = {d: fleet.states(d, version)[-1:] for d in ids if d not in good}
            log("v%d: %s on %d of %d devices in %.1f s" % (version, state, len(good), a.devices, dt))
            for d, last in sorted(bad.items()):
                log("  %s: last v%d state %s" % (d, version, json.dumps(last[0]) if last else "none"))
            if version == 2:
                summary["max_concurrent_downloads"] = srv.concurrent_max
            passed = not bad

        # The end: every device stopped gracefully (its queue saved or sent), then a marker
        # through the broker behind everything they sent, so the ledger is complete.
        marks = stop_all(procs)
        token = "%x" % random.getrandbits(32)
        obs.publish(FLUSH, token, qos=1)
        if not fleet.wait(lambda: token in fleet.flushed, 30):
            log("the consumer's flush marker did not come back in 30 s")
        ok = figures(summary, fleet, srv, procs, marks, ids) and passed
        return summary, ok
    finally:
        if "gaps" not in summary:
            summary.update(fleet.ledger.summary(a.devices, 0))
            summary.pop("online", None)
        if obs:
            obs.close(forget=True)
        stop_all(procs)
        for dev, p in procs.items():
            with open(os.path.join(workdir, dev + ".log"), "w") as f:
                f.write(p.output() + "\n")
        if srv:
            srv.stop()
        if broker:
            broker.stop()
        summary["seconds"] = round(time.monotonic() - t_start, 1)


def stop_all(procs, timeout=30.0):
    """Graceful stop of every device process at once; returns how many lines each had
    printed before it (testbed/devices.stop_fleet, by device)."""
    marks = {d: len(p.lines) for d, p in procs.items()}
    for p in procs.values():
        p.interrupt()
    for p in procs.values():
        p.stop(timeout)
    return marks


def figures(summary, fleet, srv, procs, marks, ids):
    """The summary's figures (into `summary`); True if the ledger lost nothing."""
    with fleet.cond:
        lsum = fleet.ledger.summary(len(ids), 0)
        confirmed = [d for d in ids if fleet.has(d, 2, "confirmed")]
        rolled = {d: fleet.states(d, 3) for d in ids if fleet.has(d, 3, "rolled_back")}
        refused = {d: fleet.states(d, 4) for d in ids if fleet.has(d, 4, "failed", refused=True)}
        births = {d: list(fleet.births[d]) for d in ids}
    reasons, why_not = {}, {}
    for states in rolled.values():
        r = [m.get("reason") for m in states if m.get("state") == "rolled_back"][-1]
        reasons[r] = reasons.get(r, 0) + 1
    for states in refused.values():
        r = [m.get("reason") for m in states if m.get("state") == "failed"][-1]
        why_not[r] = why_not.get(r, 0) + 1
    first = first_requests(list(srv.requests), "/v2/manifest.json")
    attributed = {d: t for d, t in first.items() if d is not None}
    starts = list(attributed.values()) or list(first.values())
    fw_after = {}
    for d in ids:
        fw = births[d][-1][2] if births[d] else None
        fw_after[fw] = fw_after.get(fw, 0) + 1
    counts = error_counts([procs[d] for d in ids], [marks[d] for d in ids])
    summary.update({
        "confirmed": len(confirmed),
        "rolled_back": len(rolled),
        "refused": len(refused),
        "gaps": lsum["gaps"],
        "download_start_spread_s": round(max(starts) - min(starts), 2) if starts else None,
        "download_starts_attributed": len(attributed),
        "max_concurrent_downloads": summary.get("max_concurrent_downloads"),
        "rollback_reasons": reasons,
        "refusal_reasons": why_not,
        "boot_numbers_carried": all(boots_carried(births[d]) for d in ids),
        "fw_after": fw_after,
        "telemetry": lsum["telemetry"],
        "duplicates": lsum["duplicates"],
        "http_requests": len(srv.requests),
        "process_exits": sum(len(p.exits) for p in procs.values()),
        "watchdog_resets": sum(len(p.resets) for p in procs.values()),
        "memory_errors": counts["memory_errors"],
        "stop_errors": counts["stop_errors"],
    })
    n = len(ids)
    return (summary["confirmed"] == summary["rolled_back"] == summary["refused"] == n
            and summary["gaps"] == 0)


def main(argv=None):
    a = parse_args(argv)
    temp = a.workdir is None
    if temp:
        a.workdir = tempfile.mkdtemp(prefix="ota-demo-")
    ok = False
    try:
        summary, ok = run(a)
    finally:
        if temp and ok and not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
        else:
            log("workdir kept: %s (device output in DEVICE.log)" % a.workdir)
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
