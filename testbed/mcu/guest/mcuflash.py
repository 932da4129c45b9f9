# Guest side of testbed/mcu (runs on the bare-metal builds under QEMU, never frozen, never on
# a real board): the testbed's flash chip. QEMU gives the machine more RAM than the firmware
# was linked for; the part above it stands in for a board's flash: outside the GC heap, as a
# board's QSPI/SPI flash is, so a test's flash images cost the firmware no heap. testbed/mcu/
# test.py loads the root filesystem's image (littlefs2, built on the host) at the start of
# the area; the rest is handed out as the tests' flash images (unixflash.py beside this).
import uctypes
from micropython import const

_ALIGN = const(4096)


def put(addr, data):
    """Write data at addr. Through a view of exactly its size: a slice assignment into a
    larger bytearray or memoryview (view[a:b] = data) also moves everything after b onto
    itself (py/obj.h, mp_seq_replace_slice_no_grow), O(size of the view) per write."""
    uctypes.bytearray_at(addr, len(data))[:] = data


class Area:
    """A block device over `size` bytes of the chip at `addr` (plain reads and writes, as
    the Unix port's image file behaves; erase only counts)."""

    def __init__(self, addr, size, block_size=_ALIGN):
        self.addr = addr
        self.size = size
        self.block_size = block_size
        self.blocks = size // block_size
        self.mv = memoryview(uctypes.bytearray_at(addr, size))

    def readblocks(self, block, buf, off=0):
        o = block * self.block_size + off
        buf[:] = self.mv[o:o + len(buf)]

    def writeblocks(self, block, buf, off=None):
        put(self.addr + block * self.block_size + (off or 0), buf)

    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return self.block_size
        if op == 6:
            return 0
        return None

    def erase_all(self):
        ff = b"\xff" * 1024
        for a in range(self.addr, self.addr + self.size, 1024):
            put(a, ff)


class Chip:
    """The image area: first fit over [addr, addr + size); an image keeps its place (and
    its bytes, as a file on the host keeps them) until dropped."""

    def __init__(self, addr, size):
        self.free = [(addr, size)]
        self.images = {}  # name -> Area

    def create(self, name, size):
        size = (size + _ALIGN - 1) // _ALIGN * _ALIGN
        for i, (a, n) in enumerate(self.free):
            if n >= size:
                if n == size:
                    self.free.pop(i)
                else:
                    self.free[i] = (a + size, n - size)
                area = Area(a, size)
                area.erase_all()
                self.images[name] = area
                return area
        raise OSError(28)  # ENOSPC: the chip is full (testbed/mcu/test.py sets its size)

    def drop(self, name):
        area = self.images.pop(name, None)
        if area is None:
            return
        self.free.append((area.addr, area.size))
        self.free.sort()
        merged = []
        for a, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == a:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((a, n))
        self.free = merged


CHIP = None  # the Chip, set by mcurun before any test module is imported
