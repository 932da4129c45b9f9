# The Unix port's stand-in for a board's start-up: a board's firmware runs boot.py and then
# main.py from the root of its flash, in one interpreter with one set of globals, and the
# runner (testbed/devices.py) starts every simulated board this way, never at main.py: a
# process started at main.py once hid a loader defect that every update would have hit.
#
#   micropython unixboot.py ROOT [board arguments...]
#
# ROOT holds boot.py and main.py (the checkout, build/, or a frozen build's copy of them);
# it takes the place of this file's directory on sys.path, as / is a board's first entry.
#
#   micropython -i unixboot.py --pty FLASH raw|friendly SIZE [board arguments...]
#
# A board on a pseudo-terminal (tools/ptyboard.py starts it, one process per boot): FLASH
# (a littlefs image of SIZE bytes when new, or a directory) becomes the root filesystem, as
# a board's flash is, so what mpremote copies to / is what boot.py, main.py and the
# firmware find there. `raw`: the
# host soft-reset the board from the raw REPL, after which a board runs boot.py and not
# main.py. -i leaves the REPL on the terminal afterwards, as a board's is.
import sys


def _start():
    root = sys.argv.pop(1)
    if root == "--pty":
        _pty_board()
        return
    sys.path[0] = root
    g = globals()
    for name in ("boot.py", "main.py"):
        with open(root + "/" + name) as f:
            code = compile(f.read(), name, "exec")
        exec(code, g)


class _Machine:
    """The machine module with the reset the Unix port lacks: the process ends with the
    reset's exit code (firmware/boards/unix.py RESET_EXIT) and tools/ptyboard.py powers the
    board up again, as a board's reset does."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def reset(self):
        raise SystemExit(75)


def _pty_board():
    import os

    import machine
    import unixflash
    import vfs

    flash = sys.argv.pop(1)
    raw = sys.argv.pop(1) == "raw"
    size = int(sys.argv.pop(1))
    sys.modules["machine"] = _Machine(machine)
    try:
        fs = vfs.VfsPosix(flash) if os.stat(flash)[0] & 0x4000 else None
    except OSError:
        fs = None
    if fs is None:
        fs = unixflash.open_flash(flash, size)[1]
    # unixflash stays imported: the loader and the board layer import it, and after the
    # remount below it is no longer on any path.
    vfs.umount("/")
    vfs.mount(fs, "/")
    os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]
    tmp = os.getenv("PTYBOARD_TMP")
    if tmp:
        # Scratch space outside the board's flash (tools/ptyboard.py --tmp): the unit tests'
        # own flash images, which inside the board's littlefs took minutes each.
        vfs.mount(vfs.VfsPosix(tmp), "/tmp")
    rom = getattr(vfs, "rom_ioctl", None)
    if rom is not None and rom(1) > 0:
        # A build with a ROMFS partition (make board-model: board-model-romfs): mounted at
        # /rom before boot.py, as a board's port does, and on sys.path where a board has it.
        try:
            vfs.mount(vfs.VfsRom(rom(2, 0)), "/rom")
        except Exception:  # noqa: BLE001
            pass  # the port mounted it at start-up already, or it holds no image (erased)
        if [m for m in vfs.mount() if m[1] == "/rom"]:
            sys.path[2:2] = ["/rom", "/rom/lib"]
    g = globals()
    for name in ("boot.py",) if raw else ("boot.py", "main.py"):
        try:
            with open(name) as f:
                code = compile(f.read(), name, "exec")
        except OSError:
            continue  # a board without main.py goes on to the REPL
        try:
            exec(code, g)
        except SystemExit as e:
            # A reset (or soft reset) from boot.py or main.py: -i would fall into the REPL
            # instead of ending. The shell's parent is this process: the signal tells
            # ptyboard which reset it was.
            os.system("kill -%s $PPID" % ("USR1" if e.args and e.args[0] == 75 else "TERM"))
        except BaseException as e:  # noqa: BLE001
            # As a board: the traceback, and a failing boot.py means no main.py.
            sys.print_exception(e)
            break


if __name__ == "__main__":
    _start()
