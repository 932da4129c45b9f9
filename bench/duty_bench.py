"""Battery devices' figures (README "Battery devices"), host side, run by bench/run.py: one
duty-cycled board on the Unix port (a process per wake, as a board's deep sleep is a reset)
against a local mosquitto, through a FaultProxy that sees every packet. Prints progress on
stderr and one JSON line of figures on stdout.

The firmware runs compiled (build/, as `make mpy`), or frozen on a binary that has it.

duty_awake_ms: from the spawn of the wake's process (the board's reset) to its "deepsleep"
line (the sleep call), median and p95 over the wakes of each kind: "1" a wake that sends one
reading (send_every 1), "10" one that sends ten (send_every 10: nine readings kept in the
RTC memory, then the tenth wake sends them all), "keep" a wake that only keeps its reading;
and the same over TLS with a client certificate ("1_mtls", "10_mtls"). MicroPython's ssl
module has no session resumption (no API to keep an mbedTLS session across a reset), so
every TLS wake makes a full handshake.

duty_round_trips_per_wake: testbed/proxy.round_trips of a sending wake's connection (the
times the device waited on the broker), median; duty_bytes_per_wake: the MQTT bytes of that
connection, both directions, median, for "1" and "10".

--micropython PATH measures another binary (the board model: build/board-model/micropython).
Unix-port times are this machine's, not a board's: a board is about a hundred times slower
on CPU and its Wi-Fi and the broker's round trips come on top.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testbed import pki  # noqa: E402
from testbed.broker import Mosquitto, free_port  # noqa: E402
from testbed.devices import DeviceProcess, Spec, binary_info, device_config  # noqa: E402
from testbed.proxy import FaultProxy, round_trips  # noqa: E402
from testbed.sim import build_mpy  # noqa: E402

SCALE = 0.01  # a wake every 10 s of device time: 0.1 s of sleep here


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class _Timed(DeviceProcess):
    """A runner that notes when each process (each wake) starts and when each line came."""

    def __init__(self, *a, **kw):
        self.events = []  # (monotonic, "spawn" | line)
        super().__init__(*a, echo=lambda line: self.events.append((time.monotonic(), line)),
                         **kw)

    def _spawn(self):
        self.events.append((time.monotonic(), "spawn"))
        super()._spawn()


def _wakes(events):
    """[(awake ms, sent)] of every complete wake: spawn to the deepsleep line; sent if it
    connected to the broker."""
    out = []
    start = None
    sent = False
    for t, line in events:
        if line == "spawn":
            start, sent = t, False
        elif " I connected (" in line:
            sent = True
        elif " deepsleep " in line and start is not None:
            out.append(((t - start) * 1000, sent))
            start = None
    return out


def _stats(xs):
    xs = sorted(xs)
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 1),
            "p95": round(xs[min(len(xs) - 1, int(len(xs) * 0.95))], 1), "n": len(xs)}


def _wire(proxy):
    """(round trips, bytes) of each connection that published telemetry and disconnected,
    in the order they were made."""
    by = {}
    for p in proxy.packets:
        by.setdefault(p.conn, []).append(p)
    out = []
    for c in sorted(by):
        pks = by[c]
        ups = [p.type for p in pks if p.dir == "up"]
        if "DISCONNECT" not in ups or "SUBSCRIBE" in ups:
            continue  # the first connection of a boot subscribes: not a wake's
        size = sum(p.size + (2 if p.size < 128 else 3) for p in pks)
        out.append((round_trips(pks), size))
    return out


def run(tmp, micropython, main, send_every, wakes, tls=None):
    """One board through `wakes` wakes; returns its (wakes, wire) figures."""
    with Mosquitto(Path(tmp) / "broker", extra_conf=tls["conf"] if tls else "") as broker:
        port = tls["port"] if tls else broker.port
        with FaultProxy(broker.host, port) as proxy:
            over = {"power": {"mode": "duty", "wake_every_s": 10, "send_every": send_every},
                    "health_interval": 86400, "refresh_interval": 604800}
            files = {}
            if tls:
                over["broker"] = {"tls": tls["device"], "timeout": 5}
                files = tls["files"]
            cfg = device_config("b1", proxy.host, proxy.port, **over)
            img = os.path.join(tmp, "b%d%s.img" % (send_every, "t" if tls else ""))
            p = _Timed([Spec(img, config=cfg, files=files)], tmp, sleep_scale=SCALE,
                       micropython=micropython, main=main)
            p.start()
            end = time.monotonic() + 600
            while len(_wakes(p.events)) < wakes and time.monotonic() < end:
                time.sleep(0.2)
            p.kill()
            return _wakes(p.events)[1:], _wire(proxy)  # the first wake is a boot


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--micropython", default=os.environ.get("MICROPYTHON"))
    a = ap.parse_args()
    quick = os.environ.get("QUICK") == "1"
    # As a board runs it: compiled (make mpy), or frozen into the binary (the board model).
    main = None
    if not binary_info(a.micropython)["frozen"]:
        main = build_mpy()[0]
    n1 = 12 if quick else 40
    figures = {}
    awake = {}
    rts = {}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "pki"
        d.mkdir()
        pki.ca(d, "ca")
        pki.leaf(d, "server", "ca", san="DNS:localhost,IP:127.0.0.1")
        pki.leaf(d, "dev", "ca")
        tls_port, mtls_port = free_port(), free_port()
        mtls = {"conf": pki.tls_listeners(d, tls_port, mtls_port), "port": mtls_port,
                "device": {"ca": "/ca.der", "cert": "/client.der", "key": "/client.key.der",
                           "server_hostname": "localhost"},
                "files": {"/ca.der": str(d / "ca.der"), "/client.der": str(d / "dev.der"),
                          "/client.key.der": str(d / "dev.key.der")}}
        for kind, send_every, tls in (("1", 1, None), ("10", 10, None),
                                      ("1_mtls", 1, mtls), ("10_mtls", 10, mtls)):
            n = n1 if send_every == 1 else n1 * 5
            log("duty: %s, %d wakes" % (kind, n))
            w, wire = run(tmp, a.micropython, main, send_every, n, tls)
            awake[kind] = _stats([ms for ms, sent in w if sent])
            if kind == "10":
                awake["keep"] = _stats([ms for ms, sent in w if not sent])
            if not tls:
                rts[kind] = statistics.median([r for r, _ in wire]) if wire else None
                sizes[kind] = statistics.median([s for _, s in wire]) if wire else None
            log("  %s: awake %s" % (kind, awake[kind]))
    figures["duty_awake_ms"] = awake
    figures["duty_round_trips_per_wake"] = rts
    figures["duty_bytes_per_wake"] = sizes
    figures["duty_tls_session_resumption"] = False
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
