# Guest side of testbed/mcu: the loader's unixflash.py as the testbed's bare-metal boards
# have it. On the Unix port a flash image is a host file. Here the bytes are an area of the
# testbed's flash chip (mcuflash.py: outside the GC heap) and the file at the same path, on
# the guest's root filesystem, only says so: removing it (os.remove, mpyutil.cleanup) is
# removing the image, and the next open of the path makes a new one, as on the host. The
# rest is unixflash.py itself (in the ROMFS as _unixflash: the builds do not freeze it, and
# this module has its name), its block device writing to a "file" over the area, so the
# firmware's littlefs code and the tests get its counters (writes, erases, bytes_written)
# and power-cut injection (cut_after), not a copy of them. Reads, which count nothing, go
# straight to the area: through the file, test_otaboot ran 1.5 times the instructions.
import os

from micropython import const

import _unixflash
import mcuflash
from _unixflash import DEFAULT_FLASH, MOUNT, mount_single, open_flash  # noqa: F401

_BLOCK = const(4096)


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


class _File:
    """The image's host file of unixflash.FileBlockDevice, over its chip area (written to
    only: FileBlockDevice reads the area itself). Tests close it before they remove the
    image; the bytes stay on the chip until then."""

    def __init__(self, area):
        self.addr = area.addr
        self.pos = 0

    def seek(self, pos, whence=0):
        self.pos = pos

    def write(self, buf):
        mcuflash.put(self.addr + self.pos, buf)
        self.pos += len(buf)
        return len(buf)

    def flush(self):
        pass

    def close(self):
        pass


def forget_removed():
    """Drop the images whose files are gone (mcurun, after each test)."""
    chip = mcuflash.CHIP
    for path in list(chip.images):
        if not exists(path):
            chip.drop(path)


class FileBlockDevice(_unixflash.FileBlockDevice):
    """unixflash.FileBlockDevice over the chip area named `path` (made, erased, on first
    use) instead of a host file: its writeblocks and ioctl, with their counters."""

    def __init__(self, path, size=DEFAULT_FLASH, block_size=_BLOCK):
        self.block_size = block_size
        self.writes = 0
        self.erases = 0
        self.bytes_written = 0
        self.cut_after = None
        chip = mcuflash.CHIP
        area = chip.images.get(path)
        if area is not None and not exists(path):
            chip.drop(path)  # its file was removed: a new image
            area = None
        self.new = area is None
        if self.new:
            area = chip.create(path, size // block_size * block_size)
            with open(path, "w") as f:
                f.write("image of %d bytes in the flash chip at 0x%x\n" % (area.size, area.addr))
        self.f = _File(area)
        self.blocks = area.size // block_size
        self.mv = area.mv

    def readblocks(self, block, buf, off=0):
        o = block * self.block_size + off
        buf[:] = self.mv[o:o + len(buf)]


# unixflash's open_flash and mount_single make their block device by this name: this one.
_unixflash.FileBlockDevice = FileBlockDevice
