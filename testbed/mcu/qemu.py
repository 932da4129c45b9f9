# Host side of running `make mcu`'s bare-metal builds (build/mcu/m0, build/mcu/rv32) under
# QEMU, shared by the two that do: testbed/mcu/test.py (tests/mpy on the boards) and
# bench/mcu_bench.py (instruction counts). Both boot the same machines the same way: the
# guest's files are a ROMFS image loaded into RAM above what the firmware was linked for,
# and code goes in over the emulated UART's raw REPL. What each runs there, and how it
# reads the output and its failures, stays with it.
import json
import os
import select
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(ROOT, "build", "mcu")

MIB = 1 << 20
# `chip` (address, size) is RAM QEMU gives the machine beyond what the firmware is linked for
# (/work/shared/PLATFORM-NOTES.md): the nRF51's SRAM made 16 MiB (the firmware uses its first
# 256 KiB), the virt board's 128 MiB default (the firmware uses 0x80000000-0x80A10000).
# Outside the GC heap, as a board's flash is; each caller lays out its own use of it, the
# ROMFS image first.
BOARDS = {
    "m0": {
        "qemu": ["qemu-system-arm", "-machine", "microbit",
                 "-global", "nrf51-soc.flash-size=1048576",
                 "-global", "nrf51-soc.sram-size=%d" % (16 * MIB)],
        "package": "qemu-system-arm",
        "chip": (0x20100000, 15 * MIB),
    },
    "rv32": {
        # QEMU 7.2 refuses the port's own `-cpu rv32,zcd=off,zcmp=on` (it has no Zcmp).
        "qemu": ["qemu-system-riscv32", "-machine", "virt", "-bios", "none", "-cpu", "rv32"],
        "package": "qemu-system-misc",
        "chip": (0x81000000, 15 * MIB),
    },
}
# -icount shift=0: guest time is the instruction count (1 ns each), so a run is the same on
# any host however loaded; sleep=off: an idle guest's wait is skipped to the next timer, not
# spent.
QEMU_COMMON = ["-semihosting", "-nographic", "-monitor", "none", "-serial", "stdio",
               "-icount", "shift=0,sleep=off"]
ROMFS_SIZE = 2 * MIB


def build_info(board):
    """BUILD-INFO.json of build/mcu/BOARD (testbed/mcu/build.sh), or None if not built."""
    path = os.path.join(BUILD, board, "BUILD-INFO.json")
    if not (os.path.exists(os.path.join(BUILD, board, "firmware.elf")) and os.path.exists(path)):
        return None
    with open(path) as f:
        return json.load(f)


# ---- the guest's files: a ROMFS image -----------------------------------------------------


def _varuint(n, width=0):
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.insert(0, 0x80 | (n & 0x7F))
        n >>= 7
    return bytes([0x80] * max(0, width - len(out)) + out)  # 0x80s in front: same value


def _record(kind, payload):
    return _varuint(kind) + _varuint(len(payload)) + payload


def romfs(tree):
    """A ROMFS image (the format described in MicroPython's extmod/vfs_rom.c) of a
    directory tree: records of a varuint kind and a varuint length; a directory (4) and a
    file (5) hold their name's length and name, then a directory its entries and a file its
    data as one verbatim data record (2); the whole is a record of kind 0x14a6b1."""
    def entries(path):
        out = b""
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            head = _varuint(len(name)) + name.encode()
            if os.path.isdir(full):
                out += _record(4, head + entries(full))
            else:
                with open(full, "rb") as f:
                    out += _record(5, head + _record(2, f.read()))
        return out

    body = entries(tree)
    kind = b"\xd2\xcd\x31"  # 0x14a6b1, "RM1"
    size = _varuint(len(body))
    if (len(kind) + len(size) + len(body)) % 2:  # an image's size must be even
        size = _varuint(len(body), len(size) + 1)
    return kind + size + body


def make_image(tmp, tree, prog):
    """tmp/romfs.img of the tree; exits (prog: who says so) when it does not fit the area
    the callers leave it at the start of the chip."""
    data = romfs(tree)
    if len(data) > ROMFS_SIZE:
        raise SystemExit("%s: the guest's files take %d bytes, more than ROMFS_SIZE (%d)"
                         % (prog, len(data), ROMFS_SIZE))
    image = os.path.join(tmp, "romfs.img")
    with open(image, "wb") as f:
        f.write(data)
    return image


# ---- a boot of one board -------------------------------------------------------------------


class Guest:
    """A QEMU process of one board with the ROMFS image at the start of its chip, its UART
    on our pipes (qemu_args: more options, such as bench/mcu_mix.py's tracing)."""

    def __init__(self, board, image, qemu_args=()):
        spec = BOARDS[board]
        self.cmd = (spec["qemu"] + QEMU_COMMON + list(qemu_args) +
                    ["-device", "loader,file=%s,addr=0x%x,force-raw=on" % (image, spec["chip"][0]),
                     "-kernel", os.path.join(BUILD, board, "firmware.elf")])
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.buf = b""

    def read_until(self, token, deadline):
        """Output up to and including token; TimeoutError at the deadline, EOFError when
        QEMU exits first (each with the last of the output)."""
        while token not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(self.buf[-3000:].decode(errors="replace"))
            r, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if r:
                data = os.read(self.proc.stdout.fileno(), 65536)
                if not data:
                    raise EOFError(self.buf[-3000:].decode(errors="replace"))
                self.buf += data
        i = self.buf.index(token) + len(token)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def send(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def run(self, code, deadline):
        """Run code in the raw REPL once the board is up: what it printed, "\\x04", its
        exception if any, "\\x04>" (the raw REPL's framing, left to the caller to split)."""
        self.read_until(b">>> ", deadline)
        self.send(b"\x01")
        self.read_until(b"raw REPL; CTRL-B to exit\r\n>", deadline)
        self.send(code.encode() + b"\x04")
        self.read_until(b"OK", deadline)
        return self.read_until(b"\x04>", deadline).decode(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
