# The Unix port's flash, part of the loader (main.py, otaboot.py), which is never updated
# over the air: a littlefs2 image in a host file, so storage limits and filesystem behaviour
# match a real board. The loader opens a lone board's image first and mounts it at /flash,
# so that an application slot on it can be imported; the board layer then gets the same
# object (two littlefs objects over one image would corrupt it).
import vfs
from micropython import const

_BLOCK = const(4096)
DEFAULT_FLASH = const(1048576)
MOUNT = "/flash"
# `--flash /`: the flash is the mounted root filesystem already, as on a board (the board on
# a pty, tools/ptyboard.py).
ROOT = "/"


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
            ff = b"\xff" * 256  # erased flash; small, so a fresh image needs no 4 KB block
            for _ in range(self.blocks * block_size // 256):
                self.f.write(ff)

    def readblocks(self, block, buf, off=0):
        self.f.seek(block * self.block_size + off)
        self.f.readinto(buf)

    def writeblocks(self, block, buf, off=None):
        if self.cut_after is not None and self.writes >= self.cut_after:
            return
        self.f.seek(block * self.block_size + (off or 0))
        # No flush(): a file of the Unix port is unbuffered (each write() is the syscall),
        # so the bytes are the kernel's at once and survive a power cut (SIGKILL) as they
        # are; flush() is fsync(2), a wait for the host's disk at every block. With 250
        # boards in a process spilling their outboxes at once after a link loss, those waits
        # held the shared loop for over a minute on a real disk, and the runner reset the
        # process as hung (testbed/devices.py). A host crash is not what the simulator plays.
        self.f.write(buf)
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
    """(block device, littlefs2 object) over the image (formatted on first use); the ones
    in `opened` (the loader's, by path) when the loader has opened it already."""
    if opened and path in opened:
        return opened[path]
    bdev = FileBlockDevice(path, size)
    try:
        fs = vfs.VfsLfs2(bdev)
    except OSError:
        vfs.VfsLfs2.mkfs(bdev)
        fs = vfs.VfsLfs2(bdev)
    return bdev, fs


def flashes(argv):
    """The --flash values of a board command line."""
    return [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--flash"]


def mount_single(argv):
    """The loader's view of the command line: with exactly one --flash, that image opened
    and mounted at MOUNT, returned as {path: (bdev, fs)}; with several boards in one process
    (a fleet simulation) nothing is mounted: their modules are shared, so they all run the
    factory image and cannot be updated."""
    images = flashes(argv)
    if len(images) != 1 or images[0] == ROOT:
        return {}
    size = DEFAULT_FLASH
    for i in range(len(argv) - 1):
        if argv[i] == "--flash-size":
            size = int(argv[i + 1])
    got = open_flash(images[0], size)
    vfs.mount(got[1], MOUNT)
    return {images[0]: got}
