"""Run simulated devices (the real firmware on the MicroPython Unix port) against a broker.

    python tools/sim.py [--devices N] [--duration S] [--interval S] [--broker HOST:PORT]
                        [--workdir DIR] [--heapsize SIZE]

Starts a private mosquitto on a free port unless --broker is given, packs the devices into a
few MicroPython processes (each device has its own flash image and id), prints what they
publish, and on --duration or Ctrl-C stops them gracefully and prints one JSON summary line:
{"devices", "online", "telemetry", "gaps", "duplicates"}.
"""
import argparse
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.broker import Mosquitto  # noqa: E402
from tools.devices import DeviceProcess, Spec, device_config  # noqa: E402
from tools.ledger import Ledger  # noqa: E402
from tools.observer import Observer  # noqa: E402

DEVICES_PER_PROCESS = 250


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1, help="number of devices (default 1)")
    p.add_argument("--duration", type=float, help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--interval", type=float, default=1.0, help="telemetry period in s (default 1)")
    p.add_argument("--broker", help="HOST:PORT of an existing broker (default: start mosquitto)")
    p.add_argument("--workdir", help="flash images, configs and broker files (default: a temp dir)")
    p.add_argument("--heapsize", help="MicroPython heap per process, e.g. 128k")
    p.add_argument("--processes", type=int, help="MicroPython processes (default: by fleet size)")
    p.add_argument("--prefix", default="", help="topic prefix of the devices (default empty)")
    p.add_argument("--keepalive", type=int, default=30, help="MQTT keepalive in s (default 30)")
    p.add_argument("--quiet", action="store_true", help="do not print each message")
    a = p.parse_args(argv)
    if a.devices < 1:
        p.error("--devices must be at least 1")
    if a.interval <= 0:
        p.error("--interval must be positive")
    return a


def split(n, procs):
    """Sizes of `procs` nearly equal groups covering n devices."""
    return [n // procs + (1 if i < n % procs else 0) for i in range(procs)]


def main(argv=None):
    a = parse_args(argv)
    workdir = a.workdir or tempfile.mkdtemp(prefix="sim-")
    os.makedirs(workdir, exist_ok=True)
    broker = None
    if a.broker:
        host, _, port = a.broker.rpartition(":")
        host, port = host or "127.0.0.1", int(port)
    else:
        broker = Mosquitto(os.path.join(workdir, "broker")).start()
        host, port = broker.host, broker.port
        print("sim: mosquitto on %s:%d (log %s)" % (host, port, broker.log_path), flush=True)

    ledger = Ledger()
    lock = threading.Lock()
    tele_suffix = "/telemetry"
    status_suffix = "/status"

    def on_msg(t, topic, payload, retain):
        parts = topic[len(a.prefix):].split("/")
        if len(parts) != 3 or parts[0] != "devices":
            return
        try:
            msg = json.loads(payload)
        except ValueError:
            print("sim: non-JSON on %s" % topic, flush=True)
            return
        with lock:
            if topic.endswith(tele_suffix) and isinstance(msg.get("seq"), int):
                ledger.telemetry(parts[1], msg, t)
            elif topic.endswith(status_suffix):
                ledger.status[parts[1]] = msg
        if not a.quiet:
            print("%s %s" % (topic, payload.decode("utf-8", "replace")), flush=True)

    obs = Observer(
        host, port,
        topics=(a.prefix + "devices/+/telemetry", a.prefix + "devices/+/status"),
        on_message=on_msg,
    )
    procs = a.processes or min(a.devices, max(os.cpu_count() or 1, math.ceil(a.devices / DEVICES_PER_PROCESS)))
    echo = None if a.quiet else (lambda line: print(line, flush=True))
    fleet = []
    n = 0
    for size in split(a.devices, procs):
        specs = []
        for _ in range(size):
            dev = "sim-%04d" % n
            cfg = device_config(dev, host, port, telemetry_interval=a.interval,
                                prefix=a.prefix, broker={"keepalive": a.keepalive})
            specs.append(Spec(os.path.join(workdir, dev + ".img"), config=cfg))
            n += 1
        fleet.append(DeviceProcess(specs, workdir, heapsize=a.heapsize, echo=echo).start())

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait(a.duration)
    with lock:
        online = ledger.online()
    for p in fleet:
        p.signal(signal.SIGINT)
    for p in fleet:
        p.stop()
    time.sleep(0.5)  # let the last acknowledged messages reach the observer
    obs.close()
    if broker:
        broker.stop()
    with lock:
        summary = ledger.summary(a.devices, online)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
