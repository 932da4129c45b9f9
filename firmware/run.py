# The application's entry point, started by the loader (main.py) from the active slot or the
# factory image: a Device per board, all on one asyncio loop.
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


def main(reserve, opened=None):
    """`reserve`: room main.py took while the heap was empty; `opened`: what the loader
    opened of the flash (otaboot.load())."""
    devices = [Device(b) for b in boards(opened)]
    # The first device's buffers take the reserved room; more devices in one process run
    # on the Unix port's large heap.
    devices[0].heap_reserve = reserve
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

