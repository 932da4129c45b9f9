# The firmware package. forget() lives here so that the app and the board layer share it
# without importing each other.
import sys


def forget(name):
    """Drop a module used only at boot, so that its bytecode can be collected (an import
    later loads it again)."""
    if sys.modules.pop(name, None) is not None:
        pkg, _, attr = name.rpartition(".")
        p = sys.modules.get(pkg)
        if p is not None and attr in p.__dict__:
            delattr(p, attr)
