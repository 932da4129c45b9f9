"""A board you can touch without a board: the MicroPython Unix port on a pseudo-terminal,
which mpremote drives as it drives a board over USB.

    python tools/ptyboard.py FLASH [--link PATH] [--heap SIZE] [--control FILE]
                                   [--console FILE] [--flash-size BYTES] [--romfs FILE]
                                   [--tmp DIR]

FLASH is the board's flash: a littlefs image (made on first use, 1 MiB unless --flash-size
says otherwise), or a directory.
It is the root filesystem, so `mpremote fs cp`, `make deploy PORT=...` and `mpremote mip
install` write where the board's boot.py, main.py and firmware read. It prints

    ptyboard: PATH

with PATH the terminal to give mpremote (`mpremote connect PATH ...`), then one line per
boot and reset. --link PATH (default: FLASH + ".tty") is a symlink to the pty: mpremote
turns its read timeouts off for /dev/pts/* names, so the link is what to use.

What it does as a board does (each boot is a fresh MicroPython process, unixboot.py --pty):
- boot.py at every start, then main.py unless the host soft-reset it from the raw REPL;
- a soft reset (Ctrl-D, machine.soft_reset(), the process ending) starts it again and
  prints `MPY: soft reboot`; machine.reset() too, as a hard reset, reset cause `soft`;
- Ctrl-C interrupts running code (KeyboardInterrupt), elsewhere it is passed on;
- the watchdog the firmware arms (firmware/boards/unix.py, over UDP) keeps running through
  soft resets, as a chip's does, until a hard reset; when it is starved the board is reset
  with cause `watchdog`. Timers (the trial deadline, a deploy's hold) end at a soft reset.
- SIGUSR2 cuts the power: the process is killed and the board powered up again
  (`power-on`); SIGTERM or SIGINT turns it off for good.
The firmware sees a board whose flash is the root filesystem (`--flash /`), as on a chip.
"""
import argparse
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import termios
import time
import tty

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.venv import micropython_path  # noqa: E402

UNIXBOOT = os.path.join(ROOT, "unixboot.py")
RESET_EXIT = 75  # machine.reset() on the Unix port (firmware/boards/unix.py RESET_EXIT)
# The Unix port's REPL banner ends so; after a soft reset from the raw REPL it is hidden and
# the raw REPL entered again, as a board comes back from one already in it.
BANNER_END = b'Type "help()" for more information.\r\n>>> '
RAW_PROMPT = b"raw REPL; CTRL-B"


def sigint_caught(pid):
    """Whether the Unix port handles SIGINT now: it does only while it runs code."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("SigCgt"):
                    return bool(int(line.split()[1], 16) & 2)
    except OSError:
        pass
    return False


class PtyBoard:
    def __init__(self, flash, link=None, heap="1M", control=None, log=None, console=None,
                 size=1 << 20, romfs=None, tmp=None):
        self.flash = os.path.abspath(flash)
        self.link = link or self.flash + ".tty"
        self.heap = heap
        self.size = size
        # A MicroPython built with a ROMFS partition over a host file (make board-model's
        # board-model-romfs) takes the file from the environment.
        self.env = dict(os.environ)
        if romfs:
            self.env["MICROPY_ROMFS"] = os.path.abspath(romfs)
        if tmp:
            self.env["PTYBOARD_TMP"] = os.path.abspath(tmp)  # unixboot.py mounts it at /tmp
        self.control = control
        # Everything the board prints, host connected or not, as a serial monitor shows it.
        self.console = open(console, "ab", buffering=0) if console else None
        self.log = log or (lambda line: print("ptyboard: " + line, flush=True))
        self.boots = 0
        self.off = False
        self.power_cut = False
        self.child = None
        self.raw = False  # the host holds the raw REPL
        self.watchdog = None  # (timeout s, last feed): survives soft resets
        self.deadline = None  # a timer's reset: ends at any reset
        self.why = None  # the cause of a reset this relay made (watchdog, timer)
        self.cause = "power-on"  # of the last hard reset: a soft one keeps it

    def open(self):
        # The host's side: kept for the board's whole life, its slave open and raw here so
        # the master neither fails with EIO nor echoes while no host is connected.
        self.host, self.host_slave = pty.openpty()
        tty.setraw(self.host_slave)
        os.set_blocking(self.host, False)
        if os.path.lexists(self.link):
            os.unlink(self.link)
        os.symlink(os.ttyname(self.host_slave), self.link)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.log(self.link)

    def boot(self, cause, raw=False):
        self.boots += 1
        self.deadline = None
        self.board, slave = pty.openpty()
        tty.setraw(slave)  # no \r\r\n from ONLCR, no echo, Ctrl-C is a byte
        argv = [micropython_path(), "-X", "heapsize=" + self.heap, "-i", UNIXBOOT, "--pty",
                self.flash, "raw" if raw else "friendly", str(self.size), "--flash", "/",
                "--wdt", "127.0.0.1:%d" % self.udp.getsockname()[1], "--reset-cause", cause]
        if self.control:
            argv += ["--control", self.control]
        self.child = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                      start_new_session=True, env=self.env)
        os.close(slave)  # EIO on self.board once the child is gone
        self.hiding = 1 if raw else 0
        self.held = b""
        self.tail = b""
        self.raw = raw
        self.log("boot %d, reset cause %s%s" % (self.boots, cause,
                                                 ", raw REPL (boot.py only)" if raw else ""))

    def to_host(self, data):
        try:
            os.write(self.host, data)
        except BlockingIOError:
            termios.tcflush(self.host_slave, termios.TCIFLUSH)  # nobody reads: lost, as on a UART

    def from_board(self, data):
        if self.console:
            self.console.write(data)
        self.tail = (self.tail + data)[-96:]
        if self.hiding:
            # Back from a soft reset in the raw REPL: boot.py's output goes on, the REPL
            # banner does not, and the raw REPL is entered for the host.
            self.held += data
            data = b""
            k = self.held.find(BANNER_END)
            if self.hiding == 1 and k >= 0:
                data = self.held[:self.held.rfind(b"MicroPython ", 0, k)]
                self.held = self.held[k + len(BANNER_END):]
                self.hiding = 2
                os.write(self.board, b"\x01")
            k = self.held.find(RAW_PROMPT)
            if self.hiding == 2 and k >= 0:
                data += self.held[k:]
                self.held = b""
                self.hiding = 0
        else:
            i, j = self.tail.rfind(RAW_PROMPT), self.tail.rfind(b"information.\r\n")
            if i != j:
                self.raw = i > j
        if data:
            self.to_host(data)

    def from_host(self, data):
        if self.child is None:
            return  # between boots: nothing reads the line
        if b"\x03" in data and sigint_caught(self.child.pid):
            os.kill(self.child.pid, signal.SIGINT)
            data = data.replace(b"\x03", b"")
        if data:
            os.write(self.board, data)

    def from_runner(self, text):
        """The firmware's watchdog and timers (firmware/boards/unix.py, otaboot._runner)."""
        words = text.split()
        now = time.monotonic()
        try:
            if words[0] == "arm":
                t = int(words[2]) / 1000
                if not self.watchdog or self.watchdog[0] != t:
                    self.log("watchdog armed, %.1f s" % t)
                self.watchdog = (t, now)
            elif words[0] == "feed" and self.watchdog:
                self.watchdog = (self.watchdog[0], now)
            elif words[0] == "deadline":
                ms = int(words[1])
                self.deadline = now + ms / 1000 if ms > 0 else None
        except (IndexError, ValueError):
            pass

    def ended(self, rc):
        """The child is gone: how the board comes back (cause, raw) or None (turned off)."""
        os.close(self.board)
        self.child = None
        if self.off:
            return None
        if rc in (0, -signal.SIGTERM) and not self.power_cut and not self.why:
            # A soft reset: the watchdog runs on, and a host in the raw REPL stays there.
            self.to_host(b"MPY: soft reboot\r\n")
            self.log("soft reset")
            return self.cause, self.raw
        if self.power_cut:
            self.power_cut = False
            back = "power-on"
        elif self.why:
            back = self.why  # the watchdog's or a timer's reset, which killed it
        elif rc in (RESET_EXIT, -signal.SIGUSR1):
            self.log("reset (machine.reset)")
            back = "soft"
        else:
            self.log("crashed (exit %s)" % rc)
            back = "hard"
        self.why = None
        self.watchdog = None  # a reset stops the chip's watchdog
        return back, False

    def kill(self, why):
        self.why = why
        if self.child is not None:
            self.child.kill()

    def run(self):
        self.open()
        self.boot(self.cause)
        while True:
            fds = [self.host, self.udp] + ([self.board] if self.child else [])
            try:
                r, _, _ = select.select(fds, [], [], 0.05)
            except InterruptedError:
                r = []
            if self.host in r:
                try:
                    self.from_host(os.read(self.host, 4096))
                except BlockingIOError:
                    pass
            if self.udp in r:
                try:
                    self.from_runner(self.udp.recv(512).decode("ascii", "replace"))
                except (BlockingIOError, OSError):
                    pass
            gone = False
            if self.child and self.board in r:
                try:
                    data = os.read(self.board, 4096)
                    gone = not data
                    if data:
                        self.from_board(data)
                except OSError:
                    gone = True  # EIO: every end of the child's terminal is closed
            now = time.monotonic()
            if self.child and self.watchdog and now - self.watchdog[1] > self.watchdog[0]:
                self.log("watchdog reset after %.1f s without a feed"
                         % (now - self.watchdog[1]))
                self.kill("watchdog")
            elif self.child and self.deadline is not None and now >= self.deadline:
                self.log("reset by a timer")
                self.kill("soft")
            if gone or (self.child and self.child.poll() is not None and not r):
                back = self.ended(self.child.wait())
                if back is None:
                    return
                self.cause = back[0]
                self.boot(*back)

    def stop(self, *_):
        self.off = True
        if self.child is not None:
            self.child.kill()
        else:
            raise SystemExit(0)

    def cut_power(self, *_):
        self.log("power cut")
        self.power_cut = True
        if self.child is not None:
            self.child.kill()

    def close(self):
        if os.path.islink(self.link):
            os.unlink(self.link)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("flash", help="the board's flash: a littlefs image file or a directory")
    p.add_argument("--link", help="symlink to the pty (default FLASH.tty)")
    p.add_argument("--heap", default="1M", help="MicroPython heap (default 1M)")
    p.add_argument("--control", help="control file of the Unix board's test hooks")
    p.add_argument("--console", help="append everything the board prints to this file")
    p.add_argument("--flash-size", type=int, default=1 << 20,
                   help="bytes of a new littlefs image (default 1 MiB, an ESP32's is 2 MiB)")
    p.add_argument("--romfs", help="the ROMFS partition's host file, for a MicroPython built "
                                    "with one ($MICROPYTHON=build/board-model-romfs/micropython)")
    p.add_argument("--tmp", help="a host directory mounted at /tmp on the board: scratch "
                                  "space outside its flash (testbed/hil.py's unit tests)")
    a = p.parse_args(argv)
    board = PtyBoard(a.flash, a.link, a.heap, a.control, console=a.console, size=a.flash_size,
                     romfs=a.romfs, tmp=a.tmp)
    signal.signal(signal.SIGTERM, board.stop)
    signal.signal(signal.SIGINT, board.stop)
    signal.signal(signal.SIGUSR2, board.cut_power)
    try:
        board.run()
    finally:
        board.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
