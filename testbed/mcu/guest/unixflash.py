# Guest side of testbed/mcu: the loader's unixflash.py as the testbed's bare-metal boards
# have it. On the Unix port a flash image is a host file. Here the bytes are an area of the
# testbed's flash chip (mcuflash.py: outside the GC heap) and the file at the same path, on
# the guest's root filesystem, only says so: removing it (os.remove, mpyutil.cleanup) is
# removing the image, and the next open of the path makes a new one, as on the host. Same
# names, arguments and counters as unixflash.py (writes, erases, bytes_written, the
# power-cut injection cut_after, new, f), so the firmware's littlefs code runs unchanged.
import os

import vfs
from micropython import const

import mcuflash

_BLOCK = const(4096)
DEFAULT_FLASH = const(1048576)
MOUNT = "/flash"


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


class _File:
    """The image's host file of unixflash.FileBlockDevice (tests close it before they
    remove the image): nothing to close here, the bytes stay on the chip."""

    def close(self):
        pass


def forget_removed():
    """Drop the images whose files are gone (mcurun, after each test)."""
    chip = mcuflash.CHIP
    for path in list(chip.images):
        if not exists(path):
            chip.drop(path)


class FileBlockDevice:
    """Block device over the chip area named `path` (made, erased, on first use), counting
    writes and erases as unixflash.FileBlockDevice does."""

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
        self.f = _File()
        self.blocks = area.size // block_size
        self.addr = area.addr
        self.mv = area.mv

    def readblocks(self, block, buf, off=0):
        o = block * self.block_size + off
        buf[:] = self.mv[o:o + len(buf)]

    def writeblocks(self, block, buf, off=None):
        if self.cut_after is not None and self.writes >= self.cut_after:
            return
        mcuflash.put(self.addr + block * self.block_size + (off or 0), buf)
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


def open_flash(path, size=DEFAULT_FLASH, opened=None):
    """(block device, littlefs2 object) over the image, as unixflash.open_flash."""
    if opened and path in opened:
        return opened[path]
    bdev = FileBlockDevice(path, size)
    try:
        fs = vfs.VfsLfs2(bdev)
    except OSError:
        vfs.VfsLfs2.mkfs(bdev)
        fs = vfs.VfsLfs2(bdev)
    return bdev, fs


def mount_single(argv):
    """unixflash.mount_single: the one --flash image of argv mounted at MOUNT."""
    images = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--flash"]
    if len(images) != 1:
        return {}
    size = DEFAULT_FLASH
    for i in range(len(argv) - 1):
        if argv[i] == "--flash-size":
            size = int(argv[i + 1])
    got = open_flash(images[0], size)
    vfs.mount(got[1], MOUNT)
    return {images[0]: got}
