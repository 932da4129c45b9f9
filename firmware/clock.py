# Time the firmware measures, kept correct on a board whose millisecond ticks wrap every
# 2^30 ms (12.4 days) and whose ticks_diff only spans half of that: a wrap-free uptime,
# sleeps of any length, and the Unix board's emulation of a board's tick period (the 64-bit
# port's ticks never wrap, so without it no test could see a wrap).
import asyncio

from micropython import const

PERIOD = const(0x40000000)  # 2^30: ticks_ms() on every 32-bit port
_MASK = const(0x3FFFFFFF)
_HALF = const(0x20000000)  # ticks_diff spans [-_HALF, _HALF); ticks_add refuses beyond
# The longest single asyncio sleep: ticks_add(now, ms) raises OverflowError at 2^29 ms on
# a board, so a week-long refresh interval is slept in steps.
MAX_SLEEP_MS = const(86400000)


class EmulatedTicks:
    """A board's tick arithmetic over the host's ticks: period 2^30, starting `before_wrap_ms`
    before a wrap, shifted by `shift()` ms (a test hook that drives time forward).

    Every intermediate stays within [-2^30, 2^30): on the 32-bit board-model build small
    ints end there, and a big int per ticks_ms() call would be garbage the board does
    not make."""

    def __init__(self, host_ms, before_wrap_ms, shift=None):
        self.host_ms = host_ms
        # now = host - back (mod 2^30): `before_wrap_ms` before the wrap at the start.
        self._back = (host_ms() + before_wrap_ms) & _MASK
        self.shift = shift

    def now(self):
        t = EmulatedTicks.diff(self.host_ms() & _MASK, self._back) & _MASK
        if self.shift is not None:
            t = EmulatedTicks._plus(t, self.shift() & _MASK)
        return t

    @staticmethod
    def _plus(a, b):
        """(a + b) mod 2^30 for a, b in [0, 2^30), never leaving the small ints."""
        t = a - (_MASK - b) - 1  # a + b - 2^30, in [-2^30, 2^30)
        if t < 0:
            t = t + _MASK + 1
        return t

    @staticmethod
    def diff(a, b):
        d = a - b
        if d >= _HALF:
            d = d - _MASK - 1
        elif d < -_HALF:
            d = d + _MASK + 1
        return d

    @staticmethod
    def add(a, d):
        if d < -_HALF or d >= _HALF:
            raise OverflowError("ticks interval overflow")  # what a board raises
        if d >= 0:
            return EmulatedTicks._plus(a, d)
        t = a + d
        if t < 0:
            t = t + _MASK + 1
        return t


class Uptime:
    """Milliseconds since boot without a wrap: whole seconds plus a remainder, advanced by
    the tick difference since the last look. Correct as long as someone looks at least
    every 2^29 ms; the supervisor's watchdog loop does, every few seconds. Seconds stay
    small ints for 34 years; only ms() past 12.4 days is a big int on a 32-bit port."""

    def __init__(self, ticks_ms, ticks_diff):
        self.ticks_ms = ticks_ms
        self.ticks_diff = ticks_diff
        self._last = ticks_ms()
        self._s = 0
        self._ms = 0

    def poll(self):
        now = self.ticks_ms()
        ms = self._ms + self.ticks_diff(now, self._last)
        self._last = now
        if ms >= 1000:
            self._s += ms // 1000
            ms %= 1000
        self._ms = ms

    def s(self):
        self.poll()
        return self._s

    def ms(self):
        self.poll()
        return self._s * 1000 + self._ms


async def sleep_s(seconds, sleep_ms=asyncio.sleep_ms):
    """asyncio.sleep for any length: in steps a board's ticks_add accepts."""
    ms = int(seconds * 1000)
    while ms > 0:
        step = ms if ms < MAX_SLEEP_MS else MAX_SLEEP_MS
        await sleep_ms(step)
        ms -= step
