# Guest side of testbed/mcu: runs one tests/mpy module on a bare-metal build under QEMU, as
# tests/mpy/runner.py does on the Unix port: every test_* function, each result one
# "@@MPY {json}" line (name, ok, traceback, and here the heap free after it and its guest
# milliseconds), async tests on a new loop. The firmware is the one frozen into the build;
# the test module, mpyutil and the Unix board modules the tests use as their fixture are
# .mpy files in the ROMFS at /rom (testbed/mcu/test.py makes it), run from there in place
# as frozen code is, so loading them costs little heap and leaves it in one piece.
import gc
import io
import json
import sys
import time

import mcuflash
import unixflash


def _alias(full, name):
    """Module `name` (a file in /rom) as `full`, a submodule of a frozen
    package: a frozen package looks for its submodules among the frozen ones only, so the
    Unix board modules (which a board never freezes) are put in sys.modules under their
    names, where an import finds them first."""
    mod = __import__(name)
    sys.modules[full] = mod
    parent, _, leaf = full.rpartition(".")
    setattr(sys.modules[parent] if parent in sys.modules else __import__(parent), leaf, mod)


def _cleanup(mpyutil):
    # After each test, not only at the end as tests/mpy/runner.py does: the flash chip is
    # smaller than the host's disk. The images' files go, and with them their bytes.
    mpyutil.cleanup()
    unixflash.forget_removed()


class _OsWithEnv:
    """A test module's `os` when the module calls os.getenv, which only the Unix port has
    (a knob of a test's own): the port's os, plus getenv, for which a board has no
    environment, so every variable is unset."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def getenv(self, key, default=None):
        return default


def _emit(doc):
    print("@@MPY " + json.dumps(doc))


def setup(root_addr, root_size, chip_addr, chip_size):
    """A new root filesystem (littlefs2, as a board's) on the chip at root_addr, with /tmp
    for the tests' files; the chip's area at chip_addr for their flash images."""
    import os
    import vfs

    root = mcuflash.Area(root_addr, root_size)
    vfs.VfsLfs2.mkfs(root)
    vfs.mount(vfs.VfsLfs2(root), "/")
    os.mkdir("/tmp")
    mcuflash.CHIP = mcuflash.Chip(chip_addr, chip_size)
    # As the board's boot.py sets it: a collection every quarter of the heap allocated, so
    # that long-lived objects fill the holes low in the heap instead of being spread over
    # all of it by the garbage allocated between them.
    gc.threshold((gc.mem_free() + gc.mem_alloc()) // 4)


def main(name, aliases, skips, getenv=False, only=None):
    try:
        for full, mod in aliases:
            _alias(full, mod)
        mod = __import__(name)
        if getenv:
            mod.os = _OsWithEnv(mod.os)
    except Exception as e:
        buf = io.StringIO()
        sys.print_exception(e, buf)
        print("@@MCU-IMPORT " + json.dumps({"tb": buf.getvalue()}))
        return
    import asyncio  # noqa: F401  (before the heap figure below: every async test needs it)
    import mpyutil

    gc.collect()
    _emit({"name": "", "free": gc.mem_free()})  # heap free with the module loaded
    for fn_name in sorted(dir(mod)):
        if not fn_name.startswith("test_") or (only is not None and fn_name not in only):
            continue
        if fn_name in skips:
            _emit({"name": fn_name, "skip": skips[fn_name]})
            continue
        t0 = time.ticks_ms()
        ok, tb = mpyutil.run_test(getattr(mod, fn_name))
        ms = time.ticks_diff(time.ticks_ms(), t0)
        _cleanup(mpyutil)
        gc.collect()
        _emit({"name": fn_name, "ok": ok, "tb": tb, "free": gc.mem_free(), "ms": ms})
