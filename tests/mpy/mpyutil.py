# Helpers for the MicroPython unit tests (no unittest on the Unix port here).
import os
import sys


def run_test(fn):
    """Run one test function, a coroutine one on a fresh loop: (passed, traceback text).
    The runners' shared step (runner.py on the Unix port, testbed/mcu/guest/mcurun.py)."""
    import asyncio
    import io

    try:
        r = fn()
        if r is not None and hasattr(r, "send"):
            asyncio.run(r)
            asyncio.new_event_loop()
    except Exception as e:
        buf = io.StringIO()
        sys.print_exception(e, buf)
        return False, buf.getvalue()
    return True, ""


def run_module(mod, skip=()):
    """Every test_* function of a module but those named in `skip`, each result one
    "@@MPY {json}" line (name, ok, traceback); then the module's files are removed. The
    Unix port's runner (runner.py) and the board's (testbed/hil.py, over mpremote) print
    what pytest and hil collect."""
    import json

    for fn_name in sorted(dir(mod)):
        if fn_name.startswith("test_") and fn_name not in skip:
            ok, tb = run_test(getattr(mod, fn_name))
            print("@@MPY " + json.dumps({"name": fn_name, "ok": ok, "tb": tb}))
    cleanup()


def raises(exc, fn, *args):
    try:
        fn(*args)
    except exc as e:
        return e
    raise AssertionError("%s not raised by %r%r" % (exc.__name__, fn, args))


def fresh_image(name):
    """Path of a new flash image under /tmp; the random part keeps parallel runs apart
    (the Unix port's os has no getpid)."""
    tag = "".join("%02x" % b for b in os.urandom(4))
    path = "/tmp/mpytest-%s-%s.img" % (name, tag)
    CREATED.append(path)
    return path


# Images to remove when the module's tests are done (runner.py); a directory is listed
# before its files, so it is empty by its turn.
CREATED = []


def cleanup():
    while CREATED:
        path = CREATED.pop()  # last first: a directory's files go before it
        try:
            os.remove(path)
        except OSError:
            try:
                os.rmdir(path)
            except OSError:
                pass


def with_fake_modules(fakes, fresh, fn):
    """fn() with the modules `fakes` ({name: module or None}) in sys.modules, which an import
    takes before any built-in module (hardware modules the Unix port lacks), and the
    modules named in `fresh` imported anew by it. sys.modules, and the attributes that those
    imports add to their parent packages, are as they were afterwards, so no other test
    sees the fakes or what was built with them."""
    names = list(fakes) + [n for n in fresh if n not in fakes]
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in fresh:
            sys.modules.pop(n, None)
        for n, m in fakes.items():
            if m is not None:
                sys.modules[n] = m
        return fn()
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        for n in fresh:
            parent, _, leaf = n.rpartition(".")
            pkg = sys.modules.get(parent)
            if pkg is not None and saved[n] is None and leaf in dir(pkg):
                delattr(pkg, leaf)
