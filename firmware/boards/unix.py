# Unix-port board: flash is a littlefs2 image in a host file, so storage limits and
# filesystem behaviour match a real board; one process can drive many such boards.
# What the host lacks is modelled: the watchdog lives in the runner (testbed/devices.py) and
# is fed over UDP, the radio link is simulated, and a host-side control file lets tests take
# the link down or make a task hang (test hooks exist on this board only).
import asyncio
import gc
import os
import socket
import sys
import time

from micropython import const

from firmware.boards.base import BaseBoard
from firmware.clock import EmulatedTicks
from otaboot import RootFs
from unixflash import DEFAULT_FLASH, MOUNT, ROOT, FileBlockDevice, open_flash  # noqa: F401
# A board's ticks wrap every 12.4 days; the emulated ones start this close to a wrap, so
# every run longer than a minute crosses one.
TICKS_BEFORE_WRAP_MS = const(60000)
# A lone board's reset ends its process with this code (testbed/devices.py starts it again).
RESET_EXIT = const(75)
# A lone board's deep sleep ends its process with this code, after a line "deepsleep MS":
# the runner starts it again MS later (scaled), with the reset cause "deepsleep".
SLEEP_EXIT = const(76)


class SleepMemory:
    """An ESP32's RTC memory as the Unix board has it: kept through a deep sleep and a
    reset, lost at a power cut. A lone board keeps it in a host file that the runner
    deletes when it plays a power cut (testbed/devices.py); boards sharing a process sleep
    inside it and keep it in RAM."""

    size = 2048

    def __init__(self, path=None):
        self.path = path
        self.data = b""

    def read(self):
        if self.path is None:
            return self.data
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError:
            return b""

    def write(self, data):
        if len(data) > self.size:
            raise ValueError("RTC memory holds %d bytes" % self.size)
        if self.path is None:
            self.data = bytes(data)
            return
        with open(self.path, "wb") as f:
            f.write(data)


class Control:
    """Words in a host file that a test writes: link-down, hang-await, hang-busy, crash,
    clock=+S / clock=-S (the wall clock shifted by S seconds), host-busy=MS (the process
    blocked for MS at each reading), ticks=MS (the board's ticks driven MS ahead: days of
    uptime in seconds; raise it by less than 2^29 at a time, and again only once every
    loop of the firmware has run since, or the firmware sees a step that a board's
    ticks_diff cannot span); an app's simulated sensor and pins have their own words
    (unixhw.py). Read again at most every 100 ms, so a fleet of boards
    polling it costs little."""

    def __init__(self, path):
        self.path = path
        self.words = ()
        self._at = None

    def has(self, word):
        if self.path is None:
            return False
        now = time.ticks_ms()
        if self._at is None or time.ticks_diff(now, self._at) >= 100:
            self._at = now
            try:
                with open(self.path) as f:
                    self.words = f.read().split()
            except OSError:
                self.words = ()
        return word in self.words

    def number(self, name):
        """The number of a `name=N` word (0 without one)."""
        self.has("")  # reads the file again when due
        for w in self.words:
            if w.startswith(name) and w[len(name):len(name) + 1] == "=":
                return float(w[len(name) + 1:])
        return 0

    def clock(self):
        """Seconds `clock=+S` / `clock=-S` shifts this board's wall clock by (0 without)."""
        return self.number("clock")


class SimLink:
    """The radio link of a board, simulated: up unless the control file says link-down.
    Same methods as the boards' Wi-Fi link, so firmware/wifi.py runs unchanged."""

    def __init__(self, control):
        self.control = control
        self.joined = False

    def connect(self, ssid, password):
        self.joined = not self.control.has("link-down")

    def isconnected(self):
        if self.control.has("link-down"):
            self.joined = False
        return self.joined

    def disconnect(self):
        self.joined = False

    def rssi(self):
        return -55 if self.isconnected() else None


class SharedHeap:
    """The boards of one process share its heap, so one collect or one measurement serves
    them all, at most once per `every_ms`. Each board doing its own (the collect before
    its buffers, the bisection of health's largest free block) is cheap on a board's
    100 KB heap but not on the 24 MB of 250 simulated boards: in a fleet run their loops
    stalled for seconds and the runner's watchdog took it for a hang."""

    def __init__(self, every_ms=5000):
        self.every_ms = every_ms
        self._collected = None  # ticks of the last collect
        self._measured = None  # ticks of the last measurement
        self._figures = None

    def _due(self, at):
        return at is None or time.ticks_diff(time.ticks_ms(), at) >= self.every_ms

    def collect(self):
        if self._due(self._collected):
            gc.collect()
            self._collected = time.ticks_ms()

    def heap(self, measure):
        if self._figures is None or self._due(self._measured):
            self._figures = measure()
            self._measured = self._collected = time.ticks_ms()
        return self._figures


class LoopTicker:
    """Tells the runner's watchdog every 200 ms that this process's loop runs, and how late
    it ran. Boards sharing a process wait for each other's turns on the loop, which boards
    with their own CPUs would not: the runner does not count that lateness against their
    watchdogs (testbed/devices.py). One per process of several boards, started by the first arm."""

    def __init__(self):
        self.task = None

    def start(self, send):
        if self.task is None:
            self.task = asyncio.create_task(self._run(send))

    async def _run(self, send):
        while True:
            t = time.ticks_ms()
            await asyncio.sleep_ms(200)
            send("tick %d" % (time.ticks_diff(time.ticks_ms(), t) - 200))


class Board(BaseBoard):
    name = "unix"
    # The 32-bit board-model build (testbed/board_model) puts mbedTLS in the GC heap, as RP2
    # does; the 64-bit wheel's mbedTLS uses the C heap.
    tls_room = 21504 if sys.maxsize < 0x80000000 else 0

    def __init__(self, flash_path, flash_size=DEFAULT_FLASH, label=None, opened=None):
        self.flash_path = flash_path
        if flash_path == ROOT:
            # The flash is the root filesystem (the board on a pty): as on a board, a slot
            # imports from /ota/a and the application from /app.
            self.bdev, self.fs = None, RootFs()
            self.ota_root = ""
        else:
            self.bdev, self.fs = open_flash(flash_path, flash_size, opened)
        # Where the loader mounted this flash (a lone board): its slots can be imported, so
        # it can be updated over the air.
        if opened and flash_path in opened:
            self.ota_root = MOUNT
        self.label = label or flash_path
        self.cause = "power-on"  # the runner says otherwise after a watchdog kill
        self.control = Control(None)
        self._shift = 0
        self.set_ticks_before_wrap(TICKS_BEFORE_WRAP_MS)
        self.link = SimLink(self.control)
        self.wdt_addr = None  # (host, port) of the runner's watchdog, if it has one
        self._wdt_sock = None
        self.shared = None  # SharedHeap when the process drives more than one board
        self.sleep_memory = SleepMemory()  # --rtc-memory FILE: the runner's, for a lone board
        self.sleep_scale = 1.0  # --sleep-scale: a test's deep sleeps last this share
        self.slept_ms = None  # a deep sleep the device must play in this process (shared)
        self.ticker = None  # LoopTicker, likewise
        # app_dir, set by --app only: a host directory holding this board's package `app`.

    def resolve(self, host, port):
        # Test hook: a control word dns:NAME=IP,IP answers for NAME as a DNS server with
        # several records would (the host's resolver cannot be told so per test).
        pre = "dns:%s=" % host
        self.control.has("")
        for w in self.control.words:
            if w.startswith(pre):
                out = []
                for ip in w[len(pre):].split(","):
                    out.extend(BaseBoard.resolve(self, ip, port))
                return out
        return BaseBoard.resolve(self, host, port)

    def collect(self):
        if self.shared:
            self.shared.collect()
        else:
            BaseBoard.collect(self)

    def heap(self):
        if self.shared:
            return self.shared.heap(lambda: BaseBoard.heap(self))
        return BaseBoard.heap(self)

    def _ticks_shift(self):
        # Only forward, as ticks go: a control file caught half-written reads as no shift.
        s = int(self.control.number("ticks"))
        if s > self._shift:
            self._shift = s
        return self._shift

    def set_ticks_before_wrap(self, ms):
        """Ticks as a board's (period 2^30), starting `ms` before a wrap."""
        t = EmulatedTicks(time.ticks_ms, ms, self._ticks_shift)
        self.ticks_ms = t.now
        self.ticks_diff = t.diff
        self.ticks_add = t.add
        self.start_uptime()

    def unix_time(self):
        """Seconds since 1970, or None while the clock is not set (the host clock always is),
        plus the control file's clock= shift (a test hook: wall-clock jumps)."""
        return round(time.time() + self.control.clock(), 3)

    def read_sensors(self, rnd):
        # The host has no sensor; a plausible drifting value keeps payloads realistic.
        return {"temp_c": round(21.0 + rnd.uniform(-0.5, 0.5), 2)}

    async def sample(self, rnd):
        # Test hooks: a sensor driver stuck on an await, one that spins, one that raises;
        # and the whole process held up for a while.
        c = self.control
        if c.has("hang-await"):
            await asyncio.Event().wait()
        if c.has("hang-busy"):
            while True:
                pass
        if c.has("crash"):
            raise RuntimeError("sensor fault (test hook)")
        busy = int(c.number("host-busy"))
        if busy:
            # Stands for the other boards of a shared process holding the loop for a while
            # (a 250-board process booting): no task of any board runs meanwhile.
            print("%s host busy for %d ms (test hook)" % (self.label, busy))
            time.sleep_ms(busy)
        return self.read_sensors(rnd)

    def find_app(self):
        """Whether this board has an application (Device imports `app` if so): an update
        slot's (a bundle's app/, first on sys.path, as on a board), else --app's, put first
        on sys.path. The checkout's own app/ beside firmware/ is an example, not every
        simulated board's app. A process's modules are shared: only a lone board has one."""
        import firmware

        f = getattr(firmware, "__file__", "")  # frozen modules may have none
        slot = f[:f.rfind("/firmware/")]
        if "/ota/" in slot:
            try:
                os.stat(slot + "/app")
                return True
            except OSError:
                pass
        d = getattr(self, "app_dir", None)
        if d is None:
            if self.ota_root != "":
                return False
            try:
                os.stat("/app")  # on the root filesystem, first on sys.path as ''
                return True
            except OSError:
                return False
        sys.path.insert(0, d)  # holds only `app`: shadows nothing else
        return True

    def reset_cause(self):
        return self.cause

    def _wdt_send(self, text):
        if self.wdt_addr is None:
            return
        try:
            if self._wdt_sock is None:
                self._wdt_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._wdt_sock.setblocking(False)
                self._wdt_addr = socket.getaddrinfo(self.wdt_addr[0], self.wdt_addr[1])[0][-1]
            self._wdt_sock.sendto(text, self._wdt_addr)
        except OSError:
            pass  # a missed feed is what a watchdog is for; the next one may get through

    def arm_watchdog(self, timeout_ms):
        self._wdt_send("arm %s %d" % (self.label, timeout_ms))
        if self.ticker:
            self.ticker.start(self._wdt_send)

    def feed_watchdog(self):
        self._wdt_send("feed " + self.label)

    def deep_sleep(self, ms):
        """A lone board ends its process (SLEEP_EXIT) and the runner starts it again after
        the sleep; boards sharing a process cannot, so Device plays the sleep in it
        (slept_ms) and boots again, as after an in-process reset."""
        print("%s deepsleep %d" % (self.label, ms))
        if self.ota_root is not None:
            raise SystemExit(SLEEP_EXIT)
        self.cause = "deepsleep"
        self.slept_ms = int(ms * self.sleep_scale)
        self._wdt_send("disarm " + self.label)  # a sleeping chip's watchdog does not run

    def reset(self):
        """No hardware to reset. A lone board whose flash the loader mounted ends its
        process (exit code RESET_EXIT): the runner starts it again, so the loader runs again
        and may pick another slot, as after a board's reset. Otherwise Device.run boots the
        device again in this process."""
        if self.ota_root is not None:
            raise SystemExit(RESET_EXIT)
        self.cause = "soft"
        self.start_uptime()
