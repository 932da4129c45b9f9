# Unix-port board: flash is a littlefs2 image in a host file, so storage limits and
# filesystem behaviour match a real board; one process can drive many such boards.
import sys
import time

import vfs
from micropython import const

from firmware.boards.base import BaseBoard

_BLOCK = const(4096)
DEFAULT_FLASH = const(1048576)


class FileBlockDevice:
    """Block device over a host file, counting writes and erases so tests and benchmarks
    get exact flash-wear figures."""

    def __init__(self, path, size=DEFAULT_FLASH, block_size=_BLOCK):
        self.block_size = block_size
        self.blocks = size // block_size
        self.writes = 0
        self.erases = 0
        self.bytes_written = 0
        # Power-cut injection for tests: once `writes` reaches this, every later write and
        # erase is dropped, so the image stays as it was at the cut.
        self.cut_after = None
        try:
            self.f = open(path, "r+b")
            self.f.seek(0, 2)
            have = self.f.tell()
            if have:
                self.blocks = have // block_size
            self.new = not have
        except OSError:
            self.f = open(path, "w+b")
            self.new = True
        if self.new:
            ff = b"\xff" * block_size
            for _ in range(self.blocks):
                self.f.write(ff)
            self.f.flush()

    def readblocks(self, block, buf, off=0):
        self.f.seek(block * self.block_size + off)
        self.f.readinto(buf)

    def writeblocks(self, block, buf, off=None):
        if self.cut_after is not None and self.writes >= self.cut_after:
            return
        self.f.seek(block * self.block_size + (off or 0))
        self.f.write(buf)
        self.f.flush()
        self.writes += 1
        self.bytes_written += len(buf)

    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return self.block_size
        if op == 6:
            if self.cut_after is None or self.writes < self.cut_after:
                self.erases += 1
            return 0
        return None


def open_flash(path, size=DEFAULT_FLASH):
    """Mount-free littlefs2 object over the image (formatted on first use)."""
    bdev = FileBlockDevice(path, size)
    try:
        fs = vfs.VfsLfs2(bdev)
    except OSError:
        vfs.VfsLfs2.mkfs(bdev)
        fs = vfs.VfsLfs2(bdev)
    return bdev, fs


class Board(BaseBoard):
    name = "unix"

    def __init__(self, flash_path, flash_size=DEFAULT_FLASH, label=None):
        self.flash_path = flash_path
        self.bdev, self.fs = open_flash(flash_path, flash_size)
        self.label = label or flash_path
        self._t0 = time.ticks_ms()

    def uptime_ms(self):
        return time.ticks_diff(time.ticks_ms(), self._t0)

    def unix_time(self):
        """Seconds since 1970, or None while the clock is not set (the host clock always is)."""
        return round(time.time(), 3)

    def read_sensors(self, rnd):
        # The host has no sensor; a plausible drifting value keeps payloads realistic.
        return {"temp_c": round(21.0 + rnd.uniform(-0.5, 0.5), 2)}

    async def network_up(self, networks):
        """No radio on the host: the link is the host's network."""
        return True

    def feed_watchdog(self):
        pass

    def reset(self):
        """No hardware to reset: Device.run boots the device again in this process."""


def _usage(msg):
    print("unix board: " + msg)
    print(
        "usage: micropython main.py [--flash-size BYTES] --flash IMAGE "
        "[--put DEST=HOSTFILE]... [--flash IMAGE2 ...]"
    )
    sys.exit(2)


def boards_from_argv(argv):
    """--flash IMAGE starts a device; --put DEST=SRC copies a host file onto that device's
    flash before it boots (what `mpremote cp` does for a real board)."""
    size = DEFAULT_FLASH
    out = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if i + 1 >= len(argv):
            _usage("missing value after " + a)
        v = argv[i + 1]
        i += 2
        if a == "--flash-size":
            size = int(v)
        elif a == "--flash":
            out.append(Board(v, size))
        elif a == "--put":
            if not out:
                _usage("--put before any --flash")
            dest, _, src = v.partition("=")
            with open(src, "rb") as f:
                data = f.read()
            with out[-1].fs.open(dest, "wb") as f:
                f.write(data)
        else:
            _usage("unknown option " + a)
    if not out:
        out.append(Board("flash.img", size))
    return out
