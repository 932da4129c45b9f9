# The Unix port's stand-in for a board's start-up: a board's firmware runs boot.py and then
# main.py from the root of its flash, in one interpreter with one set of globals, and the
# runner (testbed/devices.py) starts every simulated board this way, never at main.py: a
# process started at main.py once hid a loader defect that every update would have hit.
#
#   micropython unixboot.py ROOT [board arguments...]
#
# ROOT holds boot.py and main.py (the checkout, build/, or a frozen build's copy of them);
# it takes the place of this file's directory on sys.path, as / is a board's first entry.
import sys


def _start():
    root = sys.argv.pop(1)
    sys.path[0] = root
    g = globals()
    for name in ("boot.py", "main.py"):
        with open(root + "/" + name) as f:
            code = compile(f.read(), name, "exec")
        exec(code, g)


if __name__ == "__main__":
    _start()
