# Device entry point: build a Device per board and run them on one asyncio loop.
import sys

if sys.platform == "linux":
    # On the Unix port the repo root is the "flash": lib/ must be importable as on a board.
    sys.path.append(sys.path[0] + "/lib")

import asyncio

from firmware.app import Device, run_devices, stop_devices
from firmware.boards import boards


def main():
    devices = [Device(b) for b in boards()]
    try:
        asyncio.run(run_devices(devices))
    except KeyboardInterrupt:
        # Ctrl-C / SIGINT on Unix: a fresh loop for the graceful stop.
        asyncio.new_event_loop()
        asyncio.run(stop_devices(devices, loop_restarted=True))
    except Exception as e:
        # Outside every supervised task: recorded as a crash, then the board resets (on
        # Unix the process ends with the traceback).
        for d in devices:
            d.crashed(e)
        raise


main()
