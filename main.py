# Device entry point: build a Device per board and run them on one asyncio loop.
import gc
import sys

# Loading the firmware's bytecode leaves the heap in small scattered holes: on a 128 KB
# heap (64-bit Unix port) 59 KB were free after boot but no block of 8 KB was, and the
# outbox's RAM ring could not be allocated. So the room for the buffers that live as long
# as the boot (outbox ring, MQTT rx/tx, flash record: 11 KB by default) is taken
# first, while the heap is empty and in one piece, and released just before they are
# allocated (Device.build).
gc.collect()
_early = [bytearray(12288)]

if sys.platform == "linux":
    # On the Unix port the repo root is the "flash": lib/ must be importable as on a board.
    sys.path.append(sys.path[0] + "/lib")

import asyncio
import micropython

from firmware.app import Device, run_devices, stop_devices
from firmware.boards import boards


def _unlock_heap():
    """A Ctrl-C that lands while the heap is locked can leave it locked (seen once in a
    50-device storm: the stop then failed with "heap is locked" and the queue was not
    saved). Release the leftover lock levels, each only while allocation still fails, so a
    heap that is not locked is never unlocked below zero."""
    for _ in range(8):
        try:
            bytearray(16)
            return
        except MemoryError as e:
            if not (e.args and "locked" in e.args[0]):
                return  # out of memory, not locked: nothing to release
            micropython.heap_unlock()


def main():
    devices = [Device(b) for b in boards()]
    # The first device's buffers take the reserved room; more devices in one process run
    # on the Unix port's large heap.
    devices[0].heap_reserve = _early
    try:
        asyncio.run(run_devices(devices))
    except KeyboardInterrupt:
        # Ctrl-C / SIGINT on Unix: a fresh loop for the graceful stop.
        _unlock_heap()
        asyncio.new_event_loop()
        asyncio.run(stop_devices(devices, loop_restarted=True))
    except Exception as e:
        # Outside every supervised task: recorded as a crash, then the board resets (on
        # Unix the process ends with the traceback).
        for d in devices:
            d.crashed(e)
        raise


main()
