# Guest-side rig of bench/mcu_bench.py, imported by every scenario (device.py, pure.py,
# peers.py: `from rig import *`): the instruction clock, a virtual clock for asyncio, a fake
# broker behind a fake socket, a RAM flash with littlefs, a fake board. Runs on MicroPython
# only (the qemu port under QEMU; the Unix port while developing). Nothing here is
# imported by the firmware.
#
# Under `qemu-system-* -icount shift=0` the guest clock advances 1 ns per instruction, so
# time.ticks_us() differences are instructions / 1000: every span here is in ticks_us and
# the host turns it into instructions. On the Unix port they are plain microseconds.
#
# Sleeps cost no instructions on a board (the CPU idles), but idling in the guest would be
# counted: the asyncio loop polls. So asyncio runs on a virtual clock (Warp): when no task
# can run until a timer, the clock jumps to that timer instead of waiting. Instructions
# spent are then only the work done, and a 100 ms sleep costs what waking up costs.
import gc
import io
import sys
import time

# What the host asks for: filled by the bootstrap (bench/mcu_bench.py) before a scenario is
# imported.
PARAMS = {}


def out(**kw):
    """One line of figures for the host (bench/mcu_bench.py reads "@@MCU {json}")."""
    import json

    print("@@MCU " + json.dumps(kw))


def us():
    return time.ticks_us()


def since(t0):
    return time.ticks_diff(time.ticks_us(), t0)


# The collector: a per-op figure is the operation's own instructions, measured with the
# collector off (gc.disable(), after a collect), and the garbage it leaves (STATS["alloc"],
# bytes per op): how often a board collects, and what that costs, depends on its heap
# (collect_cost()). N is cut to what fits in the free heap without a collection. Operations
# that allocate more than that (a signature check, a config layer, a drain) are measured with
# the collector on (gc_off=False), its collections included.
STATS = {"alloc": None, "n": None}


def _fit(n, alloc_one):
    if alloc_one <= 0:
        return n
    return max(1, min(n, int(gc.mem_free() * 0.6 / alloc_one)))


def per_op(fn, n, warm=2, gc_off=True):
    """ticks_us per call of fn() (plain), after `warm` calls and a collect."""
    for _ in range(warm):
        fn()
    gc.collect()
    if gc_off:
        a0 = gc.mem_alloc()
        gc.disable()
        try:
            fn()
        finally:
            gc.enable()
        n = _fit(n, gc.mem_alloc() - a0)
        gc.collect()
        a0 = gc.mem_alloc()
        gc.disable()
    try:
        t0 = us()
        for _ in range(n):
            fn()
        dt = since(t0)
    finally:
        gc.enable()
    STATS["alloc"] = (gc.mem_alloc() - a0) / n if gc_off else None
    STATS["n"] = n
    return dt / n


async def aper_op(fn, n, warm=2, gc_off=True):
    """The same for an async fn (the other tasks' work meanwhile included)."""
    for _ in range(warm):
        await fn()
    gc.collect()
    if gc_off:
        a0 = gc.mem_alloc()
        gc.disable()
        try:
            await fn()
        finally:
            gc.enable()
        n = _fit(n, gc.mem_alloc() - a0)
        gc.collect()
        a0 = gc.mem_alloc()
        gc.disable()
    try:
        t0 = us()
        for _ in range(n):
            await fn()
        dt = since(t0)
    finally:
        gc.enable()
    STATS["alloc"] = (gc.mem_alloc() - a0) / n if gc_off else None
    STATS["n"] = n
    return dt / n


def collect_cost():
    """(ticks_us of one full collect, free heap after it) in the current state."""
    gc.collect()
    t0 = us()
    gc.collect()
    return since(t0), gc.mem_free()


# ---- virtual clock for asyncio ----------------------------------------------------------


class Warp:
    """asyncio's clock = ticks_ms + off. When the loop would wait for a timer with nothing
    else to do, off jumps by the wait (counted in `skipped_ms`).

    The loop's wait is its call `_io_queue.wait_io_event(dt)`. The host sends asyncio's own
    run_until_complete with that one call changed to go to Warp.wait when dt is not 0
    (module `warploop`, made by bench/mcu_bench.py from the build's MicroPython checkout),
    so a turn of the loop costs what it costs on a board. Without it, the call is wrapped
    (`mode` "wrapper"), which adds a Python call to every turn: about 4,800 instructions
    on the M0, a quarter of a turn."""

    off = 0
    skipped_ms = 0
    limit_ms = 600000  # a guard: a scenario that sleeps this long (virtual) is stuck
    mode = None

    @staticmethod
    def ticks():
        return time.ticks_add(time.ticks_ms(), Warp.off)

    @staticmethod
    def wait(dt):
        """What the loop does instead of waiting dt ms (not 0) for a timer."""
        from asyncio import core

        core._io_queue.wait_io_event(0)
        t = core._task_queue.peek()
        if t is not None and time.ticks_diff(t.ph_key, Warp.ticks()) <= 0:
            return  # I/O made a task runnable
        if dt < 0 or t is None:
            raise RuntimeError("warp: every task waits for I/O that cannot come")
        d = time.ticks_diff(t.ph_key, Warp.ticks())
        Warp.off += d
        Warp.skipped_ms += d
        if Warp.skipped_ms > Warp.limit_ms:
            raise RuntimeError("warp: slept %d ms" % Warp.skipped_ms)

    @staticmethod
    def install():
        """Into asyncio (again after asyncio.new_event_loop() when wrapping)."""
        from asyncio import core

        core.ticks = Warp.ticks
        try:
            import warploop

            src = warploop.SRC
        except ImportError:
            src = None
        if src:
            core.__dict__["_warp_wait"] = Warp.wait
            exec(src, core.__dict__)
            Warp.mode = "inline"
            return
        q = core._io_queue
        orig = q.wait_io_event

        def wait(dt):
            if dt:
                Warp.wait(dt)
            else:
                orig(0)

        q.wait_io_event = wait
        Warp.mode = "wrapper"


# ---- the fake broker behind a fake socket -------------------------------------------------

_POLLIN = 1
_POLLOUT = 4
# _SLICE: MicroPython's `buf[a:b] = data` with len(data) == b - a also memmoves everything
# after b onto itself (py/objarray.c, mp_seq_replace_slice_no_grow), so it costs in
# proportion to len(buf) - b: 40,000 instructions for 10 bytes into an 8 KiB buffer on the
# M0. The rig's copies therefore go into a view of their own size (`mv[a:b][:] = data`), as
# a board's C socket and flash drivers copy only what they are given.


_SOCKBUF = None  # (rx, tx) of every FakeBroker


class FakeBroker(io.IOBase):
    """A socket whose peer is an instant MQTT 3.1.1 broker: CONNECT -> CONNACK, SUBSCRIBE ->
    SUBACK granting QoS 1, PUBLISH QoS 1 -> PUBACK, PINGREQ -> PINGRESP. The same code
    serves every client measured. Its instructions count in theirs, so it is kept cheap
    (builtins bound as defaults, no method calls on the common path) and its share is
    measured apart (Recorder, socket_share): a write only appends to a buffer, as a
    socket's send copies into its TCP buffer; what was written is parsed when the client
    next polls or reads, whole packets at a time, however many writes made them. Answers
    queue in `rx` for read/readinto. Always writable; readable when an answer waits."""

    def __init__(self, rxsize=2048, txsize=8192):
        # A board's socket buffers are the network stack's, not the GC heap's: here RAM
        # outside the heap when the host gave some (PARAMS["scratch"]), else bytearrays
        # allocated once; either way shared by every socket (one is used at a time).
        global _SOCKBUF
        if _SOCKBUF is None:
            sc = PARAMS.get("scratch")
            if sc:
                import uctypes

                _SOCKBUF = (uctypes.bytearray_at(sc[0], rxsize),
                            uctypes.bytearray_at(sc[0] + rxsize, txsize))
            else:  # the Unix port: allocated once, shared as the scratch RAM is
                _SOCKBUF = (bytearray(rxsize), bytearray(txsize))
        rx, tx = _SOCKBUF
        self.rx = rx
        self.rmv = memoryview(rx)
        self.rxsize = rxsize
        self.r0 = self.r1 = 0
        self.tx = tx  # written, not parsed yet
        self.tmv = memoryview(tx)
        self.tn = 0
        self.pubs = 0  # PUBLISH packets received
        self.writes = 0
        self.polls = 0  # MP_STREAM_POLL ioctls (select.poll, asyncio's loop)
        self.closed = False
        self.first_pub = None  # ticks_us when the first PUBLISH was parsed
        self.connect_at = None  # ticks_us when the CONNECT was parsed (answered at once)
        # fn(topic bytes, qos) for every PUBLISH; while set, each write is parsed at once,
        # so the stamps are the writes'.
        self.watch = None
        self.on_cpuback = None  # fn(): the client wrote a PUBACK (for a QoS 1 PUBLISH in)

    # -- socket methods the clients use
    def setblocking(self, flag):
        pass

    def settimeout(self, t):
        pass

    def setsockopt(self, *a):
        pass

    def connect(self, addr):
        pass

    def close(self):
        self.closed = True

    def ioctl(self, req, arg):
        if req == 3:  # MP_STREAM_POLL
            self.polls += 1
            if self.tn:
                self._parse()
            return (arg & _POLLIN if self.r1 > self.r0 else 0) | (arg & _POLLOUT)
        return -1  # no file descriptor (MP_STREAM_GET_FILENO on the Unix port), nothing else

    def read(self, n=-1, bytes=bytes):
        if self.tn:
            self._parse()
        r0 = self.r0
        a = self.r1 - r0
        if not a:
            return None
        if n < 0 or n > a:
            n = a
        self.r0 = r0 + n
        return bytes(self.rmv[r0:r0 + n])

    def readinto(self, buf, n=-1, len=len, memoryview=memoryview):
        if self.tn:
            self._parse()
        r0 = self.r0
        a = self.r1 - r0
        if not a:
            return None
        k = len(buf)
        if n < 0 or n > k:
            n = k
        if n > a:
            n = a
        if n == k:
            buf[:] = self.rmv[r0:r0 + n]
        else:
            memoryview(buf)[:n][:] = self.rmv[r0:r0 + n]  # n bytes, as a socket's C copy
        self.r0 = r0 + n
        return n

    def write(self, buf, n=-1, len=len, memoryview=memoryview):
        k = len(buf)
        if n < 0:
            n = k
        elif n < k:
            buf = memoryview(buf)[:n]
        t = self.tn
        self.tmv[t:t + n][:] = buf  # into a view of its size: see _SLICE above
        self.tn = t + n
        self.writes += 1
        if self.watch:
            self._parse()
        return n

    # -- the broker
    def inject(self, data):
        """Bytes from the broker that no write asked for (a retained message)."""
        n = len(data)
        if self.r0 == self.r1:
            self.r0 = self.r1 = 0
        if self.r1 + n > self.rxsize:
            k = self.r1 - self.r0
            self.rmv[0:k][:] = self.rmv[self.r0:self.r1]
            self.r0, self.r1 = 0, k
            if k + n > self.rxsize:
                raise OSError("fake broker: rx full")
        self.rmv[self.r1:self.r1 + n][:] = data
        self.r1 += n

    def _parse(self):
        """Answer every whole packet written so far."""
        tx = self.tx
        end = self.tn
        i = 0
        while end - i >= 2:
            b0 = tx[i]
            n = tx[i + 1]
            o = i + 2
            if n & 0x80:
                n &= 0x7F
                m = 128
                while o < end:
                    b = tx[o]
                    o += 1
                    n += (b & 0x7F) * m
                    m <<= 7
                    if not b & 0x80:
                        break
                else:
                    break  # the length is not all there yet
            if o + n > end:
                break  # nor the packet
            t = b0 & 0xF0
            if t == 0x30:  # PUBLISH
                self.pubs += 1
                if self.first_pub is None:
                    self.first_pub = time.ticks_us()
                if b0 & 6:
                    tl = (tx[o] << 8) | tx[o + 1]
                    p = o + 2 + tl
                    r = self.r1
                    if r + 4 > self.rxsize:
                        self.inject(b"")  # compacts
                        r = self.r1
                    rx = self.rx
                    rx[r] = 0x40
                    rx[r + 1] = 2
                    rx[r + 2] = tx[p]
                    rx[r + 3] = tx[p + 1]
                    self.r1 = r + 4
                if self.watch:
                    tl = (tx[o] << 8) | tx[o + 1]
                    self.watch(bytes(tx[o + 2:o + 2 + tl]), (b0 >> 1) & 3)
            elif t == 0x40:  # the client's PUBACK
                if self.on_cpuback:
                    self.on_cpuback()
            elif t == 0x10:  # CONNECT
                self.connect_at = time.ticks_us()
                self.inject(b"\x20\x02\x00\x00")
            elif t == 0x80:  # SUBSCRIBE: one granted QoS per topic filter
                j = o + 2
                k = 0
                while j < o + n:
                    j += 3 + ((tx[j] << 8) | tx[j + 1])
                    k += 1
                self.inject(bytes((0x90, 2 + k, tx[o], tx[o + 1])) + b"\x01" * k)
            elif t == 0xC0:  # PINGREQ
                self.inject(b"\xd0\x00")
            i = o + n
        if i == end:
            self.tn = 0
        elif i:
            self.tmv[0:end - i][:] = self.tmv[i:end]
            self.tn = end - i


class FakeSocketModule:
    """Stands for the `socket` module: every socket is a FakeBroker (the newest in `last`)."""

    AF_INET = 2
    SOCK_STREAM = 1
    SOCK_DGRAM = 2
    IPPROTO_TCP = 6
    SOL_SOCKET = 1
    SO_REUSEADDR = 4
    last = None

    @staticmethod
    def socket(*a):
        s = FakeBroker()
        FakeSocketModule.last = s
        return s

    @staticmethod
    def getaddrinfo(host, port, *a):
        return [(2, 1, 0, "", ("192.0.2.1", port))]


def install_socket():
    """The fake socket module for every import of `socket` from now on (the qemu port has
    none; on the Unix port it replaces the real one for the modules imported after)."""
    sys.modules["socket"] = FakeSocketModule


def publish_packet(topic, payload, qos=0, pid=0, retain=False):
    """A PUBLISH as the broker would send it."""
    body = bytes((len(topic) >> 8, len(topic) & 0xFF)) + topic
    if qos:
        body += bytes((pid >> 8, pid & 0xFF))
    body += payload
    n = len(body)
    lb = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        lb.append(b | 0x80 if n else b)
        if not n:
            break
    return bytes((0x30 | (qos << 1) | (1 if retain else 0),)) + bytes(lb) + body


# ---- a replay of one client's socket calls, to tell the fake socket's share ---------------


class Recorder:
    """Notes a FakeBroker's write/read/readinto calls (and counts its polls) while
    recording, so that the same calls can be replayed against a fresh FakeBroker alone
    (socket_share). Its wrappers are gone again after stop()."""

    def __init__(self, sock):
        self.sock = sock
        self.ops = []
        self.polls = sock.polls
        w, r, ri = sock.write, sock.read, sock.readinto
        ops = self.ops

        def write(buf, n=-1):
            ops.append((0, bytes(buf[:n] if n >= 0 else buf), n))
            return w(buf, n)

        def read(n=-1):
            ops.append((1, None, n))
            return r(n)

        def readinto(buf, n=-1):
            ops.append((2, len(buf), n))
            return ri(buf, n)

        sock.write, sock.read, sock.readinto = write, read, readinto

    def stop(self, reps=20):
        """The replayed share (socket_share) of what was recorded."""
        s = self.sock
        polls = s.polls - self.polls
        del s.write, s.read, s.readinto
        return socket_share(self.ops, reps, polls)


def share_of(sock, call):
    """The fake socket's ticks_us in one call()."""
    rec = Recorder(sock)
    call()
    return rec.stop()


async def ashare_of(sock, call):
    """The same for an async call()."""
    rec = Recorder(sock)
    await call()
    return rec.stop()


class NullSock:
    """The socket methods doing nothing: the baseline a share is measured against, so that
    the replay's own loop and each Python call's frame are not counted as the fake's."""

    def write(self, buf, n=-1):
        return n

    def read(self, n=-1):
        return None

    def readinto(self, buf, n=-1):
        return None

    def ioctl(self, req, arg):
        return 0


def socket_share(ops, reps, polls=0):
    """ticks_us of the fake socket's own work in one operation: its recorded calls (a
    Recorder's) replayed alone on a fresh FakeBroker, plus `polls` poll ioctls, less the
    same calls on a NullSock."""
    bufs = {}
    for op in ops:
        if op[0] == 2 and op[1] not in bufs:
            bufs[op[1]] = bytearray(op[1])

    def replay(s):
        def once():
            for op in ops:
                k = op[0]
                if k == 0:
                    s.write(op[1], op[2])
                elif k == 1:
                    s.read(op[2])
                else:
                    s.readinto(bufs[op[1]], op[2])
            for _ in range(polls):
                s.ioctl(3, 1)
            s.r0 = s.r1 = 0  # answers nobody read in the replay (polls that found none)

        return per_op(once, reps)

    return max(0, replay(FakeBroker()) - replay(NullSock()))


# ---- flash: littlefs on a RAM block device ------------------------------------------------


class RamBdev:
    """Block device over a buffer (a bytearray, or RAM outside the GC heap that the host
    named: PARAMS["ram_disk"] = [address, size])."""

    def __init__(self, buf, block=4096):
        self.mv = memoryview(buf)
        self.block = block
        self.blocks = len(buf) // block
        self.writes = 0
        self.write_bytes = 0
        self.erases = 0
        self.reads = 0
        self.read_bytes = 0

    def readblocks(self, n, buf, off=0):
        o = n * self.block + off
        buf[:] = self.mv[o:o + len(buf)]
        self.reads += 1
        self.read_bytes += len(buf)

    def writeblocks(self, n, buf, off=None):
        o = n * self.block + (off or 0)
        self.mv[o:o + len(buf)][:] = buf  # a view of its size: see _SLICE
        self.writes += 1
        self.write_bytes += len(buf)

    def counts(self):
        return (self.reads, self.read_bytes, self.writes, self.write_bytes)

    def share(self, before, reps=100):
        """ticks_us of this driver's own work (Python readblocks/writeblocks bodies, called
        by littlefs) since counts() was `before`: the calls made times each one's cost at
        their average size, less a call of a method that does nothing. A board's driver is
        C (rp2.Flash, esp32.Partition)."""
        r, rb, w, wb = [a - b for a, b in zip(self.counts(), before)]
        null = NullSock()
        t = 0
        if r:
            buf = bytearray(max(1, rb // r))
            base = per_op(lambda: null.write(buf, 0), reps)
            t += r * max(0, per_op(lambda: self.readblocks(0, buf, 0), reps) - base)
        if w:
            buf = bytearray(max(1, wb // w))
            blk = self.blocks - 1  # the last block: littlefs has nothing there yet
            base = per_op(lambda: null.write(buf, 0), reps)
            t += w * max(0, per_op(lambda: self.writeblocks(blk, buf, 0), reps) - base)
        self.reads, self.read_bytes, self.writes, self.write_bytes = [
            a + b for a, b in zip(before, (r, rb, w, wb))]  # the measurement's own calls
        return t

    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return self.block
        if op == 6:
            self.erases += 1
            return 0
        return None


class SafeFs:
    """The littlefs object as the firmware gets it, with one difference: a file opened for
    reading that the firmware leaves to the collector (outbox/flashlog.py's read() once
    returned from inside its generator, whose `finally: f.close()` then never ran) is closed
    at the next call instead, and counted in `reaped` (files the firmware closed are not). The rig's block device is Python and allocates (a view per call), so
    a collection can start inside littlefs, and the finalisers of those files then enter
    littlefs again in the middle of its own work: its list of open files corrupted, a
    HardFault later (seen under QEMU in about one drain in eight). A board's driver is C
    and allocates nothing, so on a board the collector never runs inside littlefs."""

    def __init__(self, fs):
        self.fs = fs
        self.reading = []
        self.reaped = 0

    def _reap(self):
        r = self.reading
        while r:
            f = r.pop()
            try:
                f.tell()  # ValueError on a closed file: the firmware closed it itself
            except ValueError:
                continue
            f.close()
            self.reaped += 1

    def open(self, path, mode="r"):
        self._reap()
        f = self.fs.open(path, mode)
        if "r" in mode and "+" not in mode:
            self.reading.append(f)
        return f

    def remove(self, path):
        self._reap()
        return self.fs.remove(path)

    def rename(self, a, b):
        self._reap()
        return self.fs.rename(a, b)

    def stat(self, path):
        self._reap()
        return self.fs.stat(path)

    def ilistdir(self, path="/"):
        self._reap()
        return self.fs.ilistdir(path)

    def mkdir(self, path):
        self._reap()
        return self.fs.mkdir(path)

    def rmdir(self, path):
        self._reap()
        return self.fs.rmdir(path)

    def statvfs(self, path):
        self._reap()
        return self.fs.statvfs(path)


def ram_flash(size=None):
    """(bdev, littlefs in a SafeFs) on a fresh RAM flash: the host's off-heap RAM when it
    gave some, else a bytearray in the heap (PARAMS["disk_file"]: an image file); littlefs
    made and mounted as the board the host names does it (PARAMS["lfs"]: rp2's _boot.py
    passes progsize=256, esp32's the defaults)."""
    import vfs

    rd = PARAMS.get("ram_disk")
    if PARAMS.get("disk_file"):  # the Unix port: an image file, outside the heap too
        from unixflash import FileBlockDevice

        class FileBdev(FileBlockDevice):
            def counts(self):
                return (0, 0, 0, 0)

            def share(self, before, reps=0):
                return 0

        bdev = FileBdev(PARAMS["disk_file"], size or 262144)
        kw = PARAMS.get("lfs") or {}
        vfs.VfsLfs2.mkfs(bdev, **kw)
        return bdev, SafeFs(vfs.VfsLfs2(bdev, **kw))
    if rd:
        import uctypes

        size = min(size or rd[1], rd[1])
        buf = uctypes.bytearray_at(rd[0], size)
    else:
        buf = bytearray(size or 65536)
    bdev = RamBdev(buf)
    kw = PARAMS.get("lfs") or {}
    vfs.VfsLfs2.mkfs(bdev, **kw)
    return bdev, SafeFs(vfs.VfsLfs2(bdev, **kw))


# ---- a board with nothing real ---------------------------------------------------------------


class FakeLink:
    """The Wi-Fi station: joins at once; `up` False is an outage."""

    up = True

    def connect(self, ssid, password):
        pass

    def isconnected(self):
        return self.up

    def disconnect(self):
        pass

    def rssi(self):
        return -55


def fake_board(fs, label="bench-0001"):
    """A firmware board (BaseBoard) over a RAM flash, the fake link and the virtual clock:
    what the ESP32/RP2 boards do, minus their hardware."""
    from firmware.boards.base import BaseBoard

    class Board(BaseBoard):
        name = "bench"

        def __init__(self):
            self.fs = fs
            self.label = label
            self.link = FakeLink()
            self.lines = 0
            self.start_uptime()

        def ticks_ms(self):
            return Warp.ticks()

        def resolve(self, host, port):
            return FakeSocketModule.getaddrinfo(host, port)

        def entropy(self):
            return 0x2545F491

        def unix_time(self):
            # A set clock, as after SNTP: the 2026 epoch plus the uptime.
            return round(1767225600 + self.uptime_ms() / 1000, 3)

        def read_sensors(self, rnd):
            return {"temp_c": round(21.0 + rnd.uniform(-0.5, 0.5), 2)}

        def log(self, line):
            self.lines += 1  # the console is not part of the figures

        def load_app(self):
            return None

        def reset_cause(self):
            return "power-on"

    return Board()


def setup_paths():
    """Unix port: the checkout's firmware and lib/ on sys.path (as tests/mpy/runner.py);
    on the qemu port they are frozen and the host sends no ROOT."""
    root = PARAMS.get("root")
    if root:
        sys.path[1:1] = [root, root + "/lib"]


# ---- a desired layer of about 1 KB ---------------------------------------------------------

# Every firmware setting, an update request and an application's settings, as an operator
# tool writes them (indented); %d: the version, then telemetry_interval (alternated so that
# each offer changes something).
LAYER = """{
    "version": %d,
    "telemetry_interval": %d,
    "health_interval": 600,
    "log_level": "warn",
    "refresh_interval": 43200,
    "reconnect": {
        "base": 2,
        "cap": 300,
        "first_window": 10
    },
    "outbox": {
        "policy": "offline",
        "ram_bytes": 8192,
        "flash_bytes": 196608
    },
    "ota": {
        "version": 12,
        "url": "https://updates.example.com/fleet/pump/bundles/12/manifest.json",
        "manifest_sha256": "9f2c4e1b7a3d5c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a",
        "window_s": 7200,
        "downgrade": false,
        "reboot": "window"
    },
    "app": {
        "high_c": 28.5,
        "low_c": 4.0,
        "hysteresis_c": 0.5,
        "sample_s": 10,
        "alarm": "on",
        "relay_max_s": 900,
        "label": "pump house 3, north wall",
        "calibration_c": -0.35,
        "report_every": 5,
        "site": "north-07"
    }
}"""

# The application's declared settings (firmware/apphost.py's tuples) the layer's "app" sets.
APP_SETTINGS = (
    ("app.high_c", "num", 30, -40, 125, True),
    ("app.low_c", "num", 2, -40, 125, True),
    ("app.hysteresis_c", "num", 0.5, 0, 10, True),
    ("app.sample_s", "int", 10, 1, 3600, True),
    ("app.alarm", "choice", "on", ("on", "off"), None, True),
    ("app.relay_max_s", "int", 600, 1, 86400, True),
    ("app.label", "str", "", None, 64, True),
    ("app.calibration_c", "num", 0, -5, 5, True),
    ("app.report_every", "int", 1, 1, 100, True),
    ("app.site", "str", "", None, 64, True),
)


def layer(version):
    return LAYER % (version, 30 + version % 2)
