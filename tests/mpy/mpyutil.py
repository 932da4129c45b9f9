# Helpers for the MicroPython unit tests (no unittest on the Unix port here).
import os


def raises(exc, fn, *args):
    try:
        fn(*args)
    except exc as e:
        return e
    raise AssertionError("%s not raised by %r%r" % (exc.__name__, fn, args))


def fresh_image(name):
    """Path of a new flash image under /tmp (removed if left from an earlier run)."""
    path = "/tmp/mpytest-%s-%d.img" % (name, os.getpid() if hasattr(os, "getpid") else 0)
    try:
        os.remove(path)
    except OSError:
        pass
    return path
