# Retry and schedule timing that keeps a fleet from acting in step: full-jitter exponential
# backoff and per-device jittered periods. Pure: the caller passes the random source.


class Rng:
    """Small per-instance PRNG (xorshift32). MicroPython's `random` is one global state;
    each device needs its own stream so many devices in one process stay independent."""

    def __init__(self, seed):
        # Scramble the seed and skip the first outputs: xorshift's early values from a
        # small seed are small too, which would put every device at the start of a window.
        self._s = ((seed * 2654435761) & 0xFFFFFFFF) or 0x9E3779B9
        for _ in range(8):
            self.u32()

    def u32(self):
        s = self._s
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        self._s = s
        return s

    def random(self):
        """Uniform in [0, 1)."""
        return self.u32() / 4294967296.0

    def uniform(self, a, b):
        return a + (b - a) * self.random()


def full_jitter(attempt, base, cap, rnd):
    """Delay before retry number `attempt` (0-based): uniform(0, min(cap, base * 2**attempt)).
    The cap applies before randomising, so a long outage still spreads retries over [0, cap]."""
    ceiling = base * (1 << min(attempt, 30))
    if ceiling > cap:
        ceiling = cap
    return rnd.uniform(0, ceiling)


class Backoff:
    """Reconnect delay state for one link: attempts grow the window, and only a connection
    that stayed up `stable_s` seconds resets it, so a flapping link never retries fast."""

    def __init__(self, rnd, base=1.0, cap=120.0, first_window=5.0, stable_s=30.0):
        self.rnd = rnd
        self.base = base
        self.cap = cap
        self.first_window = first_window
        self.stable_s = stable_s
        self.attempt = 0
        self.floor = 0.0

    def first_delay(self):
        """Delay before the first attempt after a drop: the fleet must not return at once."""
        return self.rnd.uniform(0, self.first_window)

    def next_delay(self):
        d = full_jitter(self.attempt, self.base, self.cap, self.rnd)
        self.attempt += 1
        return d if d > self.floor else self.floor + self.rnd.uniform(0, self.base)

    def connected_for(self, seconds):
        """Report how long the last connection lasted; resets the attempt count if stable."""
        if seconds >= self.stable_s:
            self.attempt = 0
            self.floor = 0.0


def jittered(period, rnd, low=0.5, high=1.5):
    """A period scaled by uniform(low, high): repeated schedules drift apart across devices."""
    return period * rnd.uniform(low, high)
