"""Start firmware instances on the MicroPython Unix port (host-side, CPython).

One DeviceProcess is one MicroPython process driving one or more boards, each with its own
littlefs flash image and bootstrap config, as a fleet simulator needs. Every process starts
as a board does: `unixboot.py` runs boot.py, then main.py, in one interpreter.

It also plays the boards' hardware watchdog, which the Unix port lacks: each board arms it
and feeds it over UDP (firmware/boards/unix.py); when a board's feeds stop for its timeout,
the process is killed with SIGKILL, as a reset would, and started again, the starved board
told that its reset cause is `watchdog` (the others in the process lost power with it).
It plays deep sleep: a lone board that sleeps ends its process (SLEEP_EXIT) and is started
again after the sleep (times `sleep_scale`, so a test lives through hours of wakes in
seconds), told `deepsleep`; its RTC memory is a host file beside its flash image (IMAGE.rtc)
that survives sleeps and resets and is deleted when the power goes (a power cut, the first
start). Boards sharing a process sleep inside it (firmware/boards/unix.py).
It plays the one timer the loader uses too: a trial deadline (otaboot.arm_deadline, `deadline
MS` over the same socket, `deadline 0` to disarm) that resets a lone board when it expires.

A real board has a CPU of its own; boards sharing a process share one asyncio loop, so a
board can wait for its turn while the process boots or serves the others. A process with
several boards therefore also sends `tick LAG_MS` every 200 ms from its loop (how late
the tick ran): time the loop was that late is not counted against its boards' watchdogs,
and while the loop sends nothing at all (a process busy in one long step) no board is
judged, until the loop has been silent for `host_hang_s` (a whole process stuck: a hang).
A process of one board is judged as that board would be: its loop is its own.

And it plays the power supply: with `restart=True` a process that dies (a crash, or a
`power_cut()`, which is a SIGKILL) is powered up again after a short random off time, its
boards told `power-on` after a power cut and `hard` after a crash (what an ESP32 says after
a panic), so that safe mode tells the two apart as a board would.
"""
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from tools.venv import micropython_path, venv_tool  # shared with the operator's tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAP_PER_BOARD_K = 96  # a device's heap on the 64-bit port, with room to spare
# Devices per MicroPython process in a fleet: each process costs ~12 MB of host memory, and
# one asyncio loop serves this many boards without lagging their timers.
DEVICES_PER_PROCESS = 250
# A multi-board process whose loop has not ticked for this long is not busy but stuck.
HOST_HANG_S = 60.0
# Its loop ticks every 0.2 s: silent longer than this, it is in one long step right now.
TICK_LATE_S = 1.0
# Off time of a process between its death and the power coming back (s, random in range).
OFF_S = (0.5, 2.0)
# Exit code of a lone board's reset (firmware/boards/unix.py RESET_EXIT): started again at
# once, told `soft`, whether or not the runner restarts crashed processes.
RESET_EXIT = 75
# Exit code of a lone board's deep sleep (firmware/boards/unix.py SLEEP_EXIT), after a line
# "LABEL deepsleep MS": started again MS later (times sleep_scale), told `deepsleep`.
SLEEP_EXIT = 76
_SLEEP_LINE = re.compile(r" deepsleep (\d+)$")
# The Unix port's stand-in for a board's start-up (boot.py, then main.py).
UNIXBOOT = os.path.join(ROOT, "unixboot.py")


_INFO_PROBE = """
import sys, json
def has(m):
    try:
        __import__(m)
        return True
    except ImportError:
        return False
print(json.dumps({"version": sys.version, "maxsize": sys.maxsize,
                  "frozen": has("firmware"), "tls": has("tls")}))
"""
_info = {}  # (path, mtime) -> binary_info's answer


def binary_info(path=None):
    """What a MicroPython binary is (default micropython_path()): {"path", "version" (its
    sys.version), "bits" (32 or 64), "frozen" (the firmware is frozen in), "tls"}. Asked
    once per binary, from an empty directory, so only a frozen firmware can be found."""
    path = os.path.abspath(path or micropython_path())
    key = (path, os.stat(path).st_mtime)
    if key not in _info:
        with tempfile.TemporaryDirectory() as empty:
            r = subprocess.run([path, "-c", _INFO_PROBE], cwd=empty, capture_output=True,
                               text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError("%s -c failed (rc %s): %s" % (path, r.returncode, r.stderr))
        doc = json.loads(r.stdout.strip().splitlines()[-1])
        _info[key] = {"path": path, "version": doc["version"],
                      "bits": 32 if doc["maxsize"] < 2 ** 32 else 64,
                      "frozen": doc["frozen"], "tls": doc["tls"]}
    return dict(_info[key])


def frozen_main(workdir):
    """main.py for a build with the firmware frozen in: a copy, with boot.py, in a directory
    of its own under workdir. Run from the checkout, the firmware/ and lib/ beside main.py
    would come before the frozen modules on sys.path and silently replace them."""
    run = os.path.join(workdir, "frozen-run")
    os.makedirs(run, exist_ok=True)
    for f in ("main.py", "boot.py"):
        shutil.copy(os.path.join(ROOT, f), run)
    return os.path.join(run, "main.py")


def device_config(device_id, broker_host, broker_port, endpoints=(), **over):
    """A bootstrap config (README "Bootstrap config") for a simulated device. `endpoints`:
    further brokers [(host, port)] in priority order after (broker_host, broker_port), for
    failover; with any, "broker" is a list whose first entry holds the session keys (those
    of `broker`, which the later ones inherit) and the later ones host and port only."""
    cfg = {
        "device_id": device_id,
        "broker": {"host": broker_host, "port": broker_port, "keepalive": 30},
        "telemetry_interval": 1,
    }
    broker = over.pop("broker", None)
    if broker:
        cfg["broker"].update(broker)
    cfg.update(over)
    return with_endpoints(cfg, endpoints)


def with_endpoints(cfg, endpoints):
    """cfg with its broker object turned into the list [broker, {host, port}...] of the
    failover endpoints (unchanged when there are none)."""
    if endpoints:
        cfg["broker"] = [cfg["broker"]] + [{"host": h, "port": p} for h, p in endpoints]
    return cfg


def split(n, procs):
    """Sizes of `procs` nearly equal groups covering n devices."""
    return [n // procs + (1 if i < n % procs else 0) for i in range(procs)]


def start_fleet(configs, workdir, processes=None, app=None, **kw):
    """Start one board per bootstrap config (each with its own flash image in `workdir`,
    named after its device id), packed into a few processes: at least one per CPU core and
    at most DEVICES_PER_PROCESS boards in each; with `app` (the application package's
    directory) every board runs it, each in a process of its own (an app may keep
    module-level state, as on its board). kw goes to DeviceProcess. Returns the started
    DeviceProcesses."""
    n = len(configs)
    procs = processes or min(n, max(os.cpu_count() or 1, math.ceil(n / DEVICES_PER_PROCESS)))
    if app:
        procs = n
    fleet = []
    i = 0
    for size in split(n, procs):
        specs = [Spec(os.path.join(workdir, c["device_id"] + ".img"), config=c, app=app)
                 for c in configs[i:i + size]]
        i += size
        fleet.append(DeviceProcess(specs, workdir, **kw).start())
    return fleet


def app_dir(image, app):
    """A directory beside the flash image holding only `app`, a link to the app's source:
    the board imports it as the package `app`, whatever its directory is called."""
    d = image + ".app"
    link = os.path.join(d, "app")
    os.makedirs(d, exist_ok=True)
    target = os.path.abspath(app)
    if os.path.islink(link) and os.readlink(link) != target:
        os.remove(link)
    if not os.path.islink(link):
        os.symlink(target, link)
    return d


class Spec:
    """One simulated board: flash image path and, optionally, files to put on it first."""

    def __init__(self, image, config=None, raw_config=None, files=None, control=None,
                 app=None, sleep_memory=True):
        self.image = image
        # False: a board without memory that deep sleep keeps (an RP2040's), so a duty
        # cycle keeps its state on flash.
        self.sleep_memory = sleep_memory
        # Host directory of the board's application package (it is imported as `app`),
        # or None: the board has none. One board per process may have one.
        self.app = app
        self.config = config
        self.raw_config = raw_config
        self.files = files or {}
        # Host file of test hooks the board reads: link-down, hang-await, hang-busy, crash.
        self.control = control


class DeviceProcess:
    def __init__(self, specs, workdir, heapsize=None, flash_size=None, echo=None, env=None,
                 main=None, watchdog=True, on_watchdog=None, restart=False, off_s=OFF_S,
                 host_hang_s=HOST_HANG_S, rnd=None, micropython=None, ticks_before_wrap=None,
                 sleep_scale=1.0):
        if len(specs) > 1 and [s for s in specs if s.app]:
            # An app may keep module-level state, as it may on its board, where it is alone.
            raise ValueError("a board with an app runs in a process of its own")
        self.specs = specs
        self.workdir = workdir
        # Seconds before the boards' emulated 2^30 ms ticks wrap (None: the board's 60 s).
        self.ticks_before_wrap = ticks_before_wrap
        self.heapsize = heapsize
        self.flash_size = flash_size
        self.echo = echo  # callable(line) for live output, or None
        self.env = env
        # Any MicroPython binary (default micropython_path()); one with the firmware frozen
        # in runs main.py from a directory without firmware/ and lib/ (frozen_main).
        self.micropython = micropython or micropython_path()
        if binary_info(self.micropython)["frozen"]:
            if main is None:
                main = frozen_main(workdir)
            elif any(os.path.isdir(os.path.join(os.path.dirname(main), d))
                     for d in ("firmware", "lib")):
                raise ValueError("%s has the firmware frozen in: the firmware/ or lib/ beside "
                                 "%s would replace it" % (self.micropython, main))
        self.main = main or os.path.join(ROOT, "main.py")  # or a build/ main.py
        self.lines = []
        self.cond = threading.Condition()
        self.proc = None
        self.watchdog = watchdog
        self.on_watchdog = on_watchdog  # fn(image) before the restart: tests clear faults
        self.causes = {}  # image -> reset cause to tell it at its next start
        self.resets = []  # images reset by the watchdog, in order
        self.restart = restart  # power up again after a death (crash or power cut)
        self.off_s = off_s
        self.host_hang_s = host_hang_s
        self.rnd = rnd or random.Random()
        self.exits = []  # return codes of deaths the process caused itself (crashes)
        self.power_cuts = 0
        self.restarts = 0  # power-ups after a death (not counting watchdog resets)
        self.sleep_scale = sleep_scale
        self.sleeps = []  # deep sleeps asked for (ms, as the board asked), in order
        self._timer = None  # the power-up (after a death or a sleep) that is pending
        self._asleep = False
        self._cut = None  # the process a power cut is killing
        self._restarting = False  # dead, with the power coming back after the off time
        self._gen = 0  # spawns so far: the watchdog forgets what an earlier process armed
        # Held across kill and respawn (watchdog reset, power-up), so that the reader of a
        # dead process's output tells "replaced" from "died" without a race.
        self._lock = threading.RLock()
        self._wdt = None
        self._reader = None  # the thread reading the current process's output
        self._closed = False
        self._interrupted = False
        self._up_cause = "power-on"  # what the boards are told at the next power-up

    def argv(self):
        args = [self.micropython]
        heap = self.heapsize
        if not heap and len(self.specs) * HEAP_PER_BOARD_K > 2048:
            # Each board has a heap of its own; many in one process share the port's
            # (2 MiB by default), so give the process theirs added up.
            heap = "%dk" % (len(self.specs) * HEAP_PER_BOARD_K)
        if heap:
            args += ["-X", "heapsize=%s" % heap]
        # As a board starts: boot.py, then main.py, from the directory that holds them.
        args += [UNIXBOOT, os.path.dirname(os.path.abspath(self.main))]
        if self.flash_size:
            args += ["--flash-size", str(self.flash_size)]
        if self._wdt:
            args += ["--wdt", "127.0.0.1:%d" % self._wdt.getsockname()[1]]
        if self.ticks_before_wrap is not None:
            args += ["--ticks-before-wrap", "%g" % self.ticks_before_wrap]
        for i, s in enumerate(self.specs):
            args += ["--flash", s.image]
            if s.image in self.causes:
                args += ["--reset-cause", self.causes[s.image]]
            if s.control:
                args += ["--control", s.control]
            if not s.sleep_memory:
                args += ["--rtc-memory", "none"]
            elif len(self.specs) == 1:
                args += ["--rtc-memory", s.image + ".rtc"]
            if self.sleep_scale != 1.0:
                args += ["--sleep-scale", "%g" % self.sleep_scale]
            if s.app:
                args += ["--app", app_dir(s.image, s.app)]
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
        for s in self.specs:
            if self.causes.get(s.image, "power-on") == "power-on":
                try:
                    os.remove(s.image + ".rtc")  # the power went: so did the RTC memory
                except OSError:
                    pass
        self._gen += 1
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
        self._reader = threading.Thread(target=self._pump, args=(self.proc,), daemon=True)
        self._reader.start()

    def _pump(self, proc):
        for raw in proc.stdout:
            self._note(raw.decode("utf-8", "replace").rstrip("\n"))
        self._died(proc, proc.wait())

    def _died(self, proc, rc):
        """The output of `proc` ended: unless the runner replaced it (watchdog reset) or is
        stopping it, it crashed or lost its power; with `restart`, power comes back."""
        with self._lock:
            if proc is not self.proc or self._closed:
                return
            if proc is self._cut:
                self._cut = None
                self._up_cause = "power-on"
            elif rc == SLEEP_EXIT:
                ms = 0
                for line in reversed(self.lines[-20:]):
                    m = _SLEEP_LINE.search(line)
                    if m:
                        ms = int(m.group(1))
                        break
                self.sleeps.append(ms)
                self._up_cause = "deepsleep"
                self._restarting = self._asleep = True
                self._gen += 1  # its watchdog sleeps with it
                self._later(ms / 1000 * self.sleep_scale)
                return
            elif rc == RESET_EXIT:
                # The board reset itself (a reboot, an update): its loader runs again.
                self._note("runner: board reset")
                self._up_cause = "soft"
                self._restarting = True
                self._later(0.05)
                return
            else:
                self.exits.append(rc)
                self._note("runner: process exited (rc %s)" % rc)
                # What a board reports after a crash it did not survive (ESP32: a panic is
                # a HARD_RESET); it counts towards safe mode, a power cut does not.
                self._up_cause = "hard"
            if not self.restart:
                return
            self._restarting = True
            self._later(self.rnd.uniform(*self.off_s))

    def _later(self, s):
        """Power up again in s seconds (only the latest such timer does)."""
        self._timer = t = threading.Timer(s, lambda: self._power_up(t))
        t.daemon = True
        t.start()

    def _power_up(self, timer):
        with self._lock:
            if timer is not self._timer:
                return  # replaced (a power cut while asleep) after it fired
            self._restarting = self._asleep = False
            if self._closed:
                return
            # An RP2040 (no sleep memory) reports a deep sleep's end as a watchdog reset.
            self.causes = {s.image: "watchdog" if self._up_cause == "deepsleep"
                           and not s.sleep_memory else self._up_cause for s in self.specs}
            self.restarts += 1
            self._note("runner: power back after a restart")
            self._spawn()

    def power_cut(self):
        """SIGKILL, as pulling the power would; with `restart`, it comes back (see _died).
        A board asleep loses its RTC memory and powers up after the off time, told
        `power-on`. Returns False when there was no running process to cut."""
        with self._lock:
            if self._closed:
                return False
            if self._asleep:
                self._timer.cancel()
                self._timer = None
                self.power_cuts += 1
                self._note("runner: power cut while asleep")
                self._up_cause = "power-on"
                self._asleep = False
                self._restarting = self.restart
                if self.restart:
                    self._later(self.rnd.uniform(*self.off_s))
                return True
            if not self.alive():
                return False
            self._cut = self.proc
            self.power_cuts += 1
            self._note("runner: power cut")
            self.proc.kill()
            return True

    def down(self):
        """Dead for good: not running and no power-up coming (a watchdog reset or a
        restart after a power cut is not a dead process)."""
        with self._lock:
            return not self._restarting and not self.alive()

    def _note(self, line):
        with self.cond:
            self.lines.append(line)
            self.cond.notify_all()
        if self.echo:
            self.echo(line)

    def _watch(self):
        """The watchdog: `arm IMAGE MS` sets a board's timeout, `feed IMAGE` restarts it,
        `disarm IMAGE` stops it (a board asleep in a shared process),
        `tick LAG_MS` says the process's loop runs and was LAG_MS late (module docstring)."""
        armed = {}  # image -> (timeout s, last feed)
        deadline = None  # when the loader's trial deadline resets the process
        gen = None
        tick = None  # when a shared loop last ticked (or its process started)
        shared = len(self.specs) > 1  # boards share the loop: its lag is not theirs
        while not self._closed:
            t0 = time.monotonic()
            try:
                data = self._wdt.recv(512)
            except socket.timeout:
                data = b""
            now = time.monotonic()
            if gen != self._gen:
                # A new process (restart, power-up): its boards arm again; nothing is owed.
                # Its loop has not ticked yet: the first board arms and starts the ticks,
                # then the others boot, which can hold the loop before the first tick.
                gen, armed, tick, deadline = self._gen, {}, now, None
            if now - t0 > 0.6:
                # recv returns within its 0.1 s timeout unless this thread itself was not
                # running (a busy host, the GIL): the feeds queued meanwhile are not late,
                # so move every deadline by the time it was away. Boards count, not us.
                away = now - t0
                armed = {i: (t, last + away) for i, (t, last) in armed.items()}
                if tick is not None:
                    tick += away
            try:
                words = data.decode().split()
                if words[0] == "arm":
                    armed[words[1]] = (int(words[2]) / 1000, now)
                elif words[0] == "disarm":
                    armed.pop(words[1], None)  # asleep in a shared process; the wake arms
                elif words[0] == "feed" and words[1] in armed:
                    armed[words[1]] = (armed[words[1]][0], now)
                elif words[0] == "deadline":
                    ms = int(words[1])
                    deadline = now + ms / 1000 if ms > 0 else None
                elif words[0] == "tick":
                    tick = now
                    if shared:
                        lag = max(0, int(words[1])) / 1000
                        armed = {i: (t, min(now, last + lag)) for i, (t, last) in armed.items()}
            except (IndexError, ValueError):
                pass
            if deadline is not None and now >= deadline:
                deadline = None
                self._timer_reset()
                continue
            starved = self._starved(armed, now, tick if shared else None)
            if starved:
                # Or nothing, if the process is gone, stopping, or another since (a wake).
                self._reset(*starved, gen=gen)
                armed.clear()
        self._wdt.close()

    def _starved(self, armed, now, tick):
        """(image, seconds without a feed, why) of the board to reset, or None. `tick`: when
        a shared loop last ticked (None for a process of one board). _reset checks that the
        process still runs."""
        late = [(now - last - t, i, now - last) for i, (t, last) in armed.items()
                if now - last > t]
        if not late:
            return None
        _, image, starved = max(late)
        if tick is None or now - tick <= TICK_LATE_S:
            return image, starved, ""
        silent = now - tick
        if silent > self.host_hang_s:
            return image, starved, "; the process's loop stopped for %.1f s" % silent
        return None  # the loop is in one long step: wait for its tick, which says how long

    def _reset(self, image, starved, why="", gen=None):
        def starved_one():
            self.resets.append(image)
            if self.on_watchdog:
                self.on_watchdog(image)
            return dict({s.image: "power-on" for s in self.specs}, **{image: "watchdog"})

        self._respawn("runner: watchdog reset of %s after %.1f s without a feed%s"
                      % (image, starved, why), starved_one, gen)

    def _timer_reset(self):
        """The loader's trial deadline expired: machine.reset() on a board, here the process
        killed and started again, its boards told `soft` as after any reset of their own."""
        self._respawn("runner: board reset by the trial deadline",
                      lambda: {s.image: "soft" for s in self.specs})

    def _respawn(self, note, causes, gen=None):
        """A reset the runner plays (watchdog, timer): the running process killed, `note`
        logged, and a new one started at once with causes() as the boards' reset causes.
        Nothing when the process is gone or stopping."""
        with self._lock:
            if self._closed or not self.alive() or gen not in (None, self._gen):
                return
            self.proc.kill()
            self.proc.wait()
            self._note(note)
            self.causes = causes()
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

    def stop(self, timeout=30.0):
        """Graceful stop, then SIGKILL if it lingers. Only one SIGINT: a second one would
        cut the firmware's stop (queue to flash, offline, disconnect) short."""
        self.interrupt()
        if self.alive():
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._drained()

    def _drained(self):
        """Wait until every line the process printed is in `lines` (and echoed)."""
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(10)

    def kill(self):
        with self._lock:
            self._closed = True
            if self.alive():
                self.proc.kill()
        if self.proc:
            self.proc.wait()
            self._drained()


def stop_fleet(fleet, timeout=30.0):
    """Graceful stop of every process at once (then SIGKILL for those that linger). Returns
    how many output lines each had printed before it (what follows is the stop's)."""
    marks = [len(p.lines) for p in fleet]
    for p in fleet:
        p.interrupt()
    for p in fleet:
        p.stop(timeout)
    return marks


def error_counts(fleet, marks):
    """memory_errors: output lines naming a MemoryError while the fleet ran (before `marks`);
    stop_errors: tracebacks of graceful stops (seen rarely: "heap is locked" in the Unix
    port's new_event_loop after Ctrl-C; README "Reconnect storm")."""
    return {
        "memory_errors": sum(1 for p, m in zip(fleet, marks) for line in p.lines[:m]
                             if "MemoryError" in line),
        "stop_errors": sum(1 for p, m in zip(fleet, marks) for line in p.lines[m:]
                           if line.startswith("Traceback")),
    }
