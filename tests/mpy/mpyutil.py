# Helpers for the MicroPython unit tests (no unittest on the Unix port here).
import os


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
