# What every board does the same way (entropy, monotonic clock, console log); no hardware
# imports here, so the Unix board can share it.
import gc
import os
import time

from firmware.clock import Uptime


def largest_free_block():
    """Largest block the heap can hand out now. MicroPython has no call for it, so bisect
    with real allocations (each freed at once); ~15 tries, so only for a periodic report."""
    lo, hi = 0, gc.mem_free()
    while hi - lo > 256:
        mid = (lo + hi) // 2
        try:
            b = bytearray(mid)
            b = None
            lo = mid
        except MemoryError:
            hi = mid
    gc.collect()
    return lo


class BaseBoard:
    name = "base"
    ntp = False  # True: the clock starts unset and SNTP sets it (set_time)
    # Bytes of the GC heap kept free for mbedTLS's records while disconnected (client.py):
    # only where mbedTLS allocates from the GC heap.
    tls_room = 0
    # Where the flash is mounted, for importing an application slot from it (otaboot.py);
    # None: this board cannot be updated over the air.
    ota_root = None

    def resolve(self, host, port):
        """getaddrinfo entries (TCP) of host: every address of a name, for the MQTT client
        to try in turn."""
        import socket

        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)

    def entropy(self):
        b = os.urandom(4)
        return b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)

    # Every tick stamp and duration of the firmware goes through these three, so that the
    # Unix board can give them a board's 2^30 period (firmware/clock.py).
    def ticks_ms(self):
        return time.ticks_ms()

    def ticks_diff(self, a, b):
        return time.ticks_diff(a, b)

    def ticks_add(self, a, d):
        return time.ticks_add(a, d)

    def start_uptime(self):
        """Uptime counts from now (the boot, or the Unix board's in-process reset)."""
        self._uptime = Uptime(self.ticks_ms, self.ticks_diff)

    def uptime_ms(self):
        """Since boot, wrap-free (firmware/clock.py)."""
        return self._uptime.ms()

    def uptime_s(self):
        return self._uptime.s()

    def log(self, line):
        print(line)

    def read_sensors(self, rnd):
        return {}

    async def sample(self, rnd):
        """The readings of one telemetry message; async so a driver may wait on hardware."""
        return self.read_sensors(rnd)

    def collect(self):
        """A full collect, before long-lived buffers are allocated."""
        gc.collect()

    def heap(self):
        """(free, allocated, largest free block) in bytes, after a collect."""
        gc.collect()
        return gc.mem_free(), gc.mem_alloc(), largest_free_block()

    def reset_cause(self) -> str:
        return "unknown"

    # Memory that a deep sleep keeps and a power cut loses (ESP32: the RTC's), with read()
    # -> bytes and write(bytes) of at most `size` bytes; None: the board has none (RP2040:
    # its deep sleep ends in a reset that clears RAM), and the duty cycle keeps its state on
    # flash instead (firmware/duty.py).
    sleep_memory = None

    def deep_sleep(self, ms):
        """Sleep `ms` and wake through a reset (cause "deepsleep"). A board does not return."""
        raise NotImplementedError("this board cannot deep-sleep")

    def arm_watchdog(self, timeout_ms):
        pass

    def feed_watchdog(self):
        pass
