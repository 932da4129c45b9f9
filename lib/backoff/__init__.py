# Retry and schedule timing that keeps a fleet from acting in step: jittered exponential
# backoff and per-device jittered periods. Pure: the caller passes the random source.


class Rng:
    """Small per-instance PRNG (xorshift32). MicroPython's `random` is one global state;
    each device needs its own stream so many devices in one process stay independent.

    The 32-bit state is kept as two 16-bit halves: a 32-bit port's small ints end at 2^30,
    so whole-word arithmetic would make a big int (about 250 bytes of garbage) per draw.
    Every intermediate here stays below 2^30; the sequence is xorshift32's."""

    def __init__(self, seed):
        # Scramble the seed and skip the first outputs: xorshift's early values from a
        # small seed are small too, which would put every device at the start of a window.
        s = ((seed * 2654435761) & 0xFFFFFFFF) or 0x9E3779B9
        self._h = s >> 16
        self._l = s & 0xFFFF
        for _ in range(8):
            self._step()

    def _step(self):
        h = self._h
        lo = self._l
        # s ^= s << 13
        h ^= ((h << 13) | (lo >> 3)) & 0xFFFF
        lo ^= (lo << 13) & 0xFFFF
        # s ^= s >> 17
        lo ^= h >> 1
        # s ^= s << 5
        h ^= ((h << 5) | (lo >> 11)) & 0xFFFF
        lo ^= (lo << 5) & 0xFFFF
        self._h = h
        self._l = lo

    def u32(self):
        """The next 32-bit output (a big int on a 32-bit port: for the rare caller, NTP)."""
        self._step()
        return (self._h << 16) | self._l

    def random(self):
        """Uniform in [0, 1)."""
        self._step()
        return self._h / 65536.0 + self._l / 4294967296.0

    def uniform(self, a, b):
        return a + (b - a) * self.random()


# Refusal codes by what they ask of a client. Not now: 3.1.1 "server unavailable", 5's
# "server unavailable". Overloaded: "server busy", "quota exceeded", "connection rate
# exceeded". Will not fix itself: 3.1.1 bad protocol, id rejected, bad credentials, not
# authorised; 5's client id not valid, bad user name or password, not authorized, banned,
# bad authentication method. Any other code is an ordinary failed attempt.
_BUSY = (3, 0x88)
_OVERLOAD = (0x89, 0x97, 0x9F)
_HARD = (1, 2, 4, 5, 0x85, 0x86, 0x87, 0x8A, 0x8C)


def full_jitter(attempt, base, cap, rnd):
    """Delay before retry number `attempt` (0-based): uniform(0, min(cap, base * 2**attempt)).
    The cap applies before randomising, so a long outage still spreads retries over [0, cap]."""
    ceiling = base * (1 << min(attempt, 30))
    if ceiling > cap:
        ceiling = cap
    return rnd.uniform(0, ceiling)


class Backoff:
    """Reconnect delay state for one link.

    Delay before retry `attempt`: floor + uniform(3c/4, c), c = min(cap - floor,
    max(base, first_window) * 2**attempt) (jitter scaled from the first window).
    Full jitter lets a device draw near-zero delays again and again, so its early retries
    pile onto the first wave and a few devices retry many times; a floor of half the
    ceiling bounds the attempts per device, and growing from the first window keeps each
    retry wave at most as dense as the first one, so the peak a broker sees is set by
    first_window, not by fleet size. A first window wider than `cap` wins over it.

    The ceiling is also bounded by the time already spent offline (`offline_s`, passed
    by the caller): first_window / 2 + half of it, so a short outage never leaves devices
    sleeping far past its end (a device that failed at t is back by 1.5 t + first_window/2),
    while the count keeps the early retries apart. Delays come from the upper quarter of
    the ceiling, [3c/4, c]: with the time bound the ceiling grows by ~1.4 per attempt, and
    a wider draw would let unlucky devices try twice as often. An overload reason
    (server busy, quota exceeded, connection rate exceeded) lifts the floor like "server
    unavailable" and lets the time bound grow with all of the time offline.

    Failed attempts grow the window; only a connection that stayed up `stable_s` seconds
    resets it, so a flapping link never retries fast. A refusal that says "not now"
    (server unavailable) lifts the floor of the delay; one that will not fix itself by
    retrying (bad credentials, not authorised, id rejected) or `flap_limit` connections in
    a row that the broker closed within `flap_s` switch to hard mode: a delay of
    hard_floor + full jitter up to hard_cap. Every delay stays randomised, floors included,
    so a fleet refused at once is not refused again at once.
    """

    def __init__(self, rnd, base=1.0, cap=120.0, first_window=5.0, stable_s=30.0,
                 busy_floor=10.0, hard_floor=60.0, hard_cap=1800.0, flap_s=10.0,
                 flap_limit=3):
        self.rnd = rnd
        self.base = base
        self.cap = cap
        self.first_window = first_window
        self.stable_s = stable_s
        self.busy_floor = busy_floor
        self.hard_floor = hard_floor
        self.hard_cap = hard_cap
        self.flap_s = flap_s
        self.flap_limit = flap_limit
        self.attempt = 0
        self.floor = 0.0
        self.hard = False
        self.busy = False  # an overload reason since the last reset
        self.flaps = 0

    def first_delay(self):
        """Delay before the first attempt after a drop: the fleet must not return at once."""
        return self.rnd.uniform(0, self.first_window)

    def next_delay(self, offline_s=None):
        """Delay before the next attempt; each call counts one more attempt. offline_s:
        seconds since the link was lost (None: no time bound, e.g. Wi-Fi)."""
        a = self.attempt
        self.attempt += 1
        if self.hard:
            return self.hard_floor + full_jitter(
                a, self.hard_floor, self.hard_cap - self.hard_floor, self.rnd)
        scale = self.base if self.base > self.first_window else self.first_window
        c = self.cap - self.floor
        if c < scale:
            c = scale
        g = scale * (1 << min(a, 30))
        if g < c:
            c = g
        if offline_s is not None:
            t = self.first_window / 2 + (offline_s if self.busy else offline_s / 2)
            if t < scale:
                t = scale
            if t < c:
                c = t
        return self.floor + self.rnd.uniform(c * 0.75, c)

    def refused(self, rc):
        """CONNACK (or a server's DISCONNECT) refused with code rc: 3.1.1's return codes
        (1..5) or MQTT 5's reason codes (0x80 and up)."""
        if rc in _BUSY or rc in _OVERLOAD:
            if self.floor < self.busy_floor:
                self.floor = self.busy_floor
            if rc in _OVERLOAD:
                self.busy = True
        elif rc in _HARD:
            self._harden()

    def dropped(self, seconds):
        """A connection ended after `seconds`; returns the delay before reconnecting."""
        if seconds >= self.stable_s:
            self.attempt = 0
            self.floor = 0.0
            self.hard = False
            self.busy = False
            self.flaps = 0
            return self.first_delay()
        if seconds < self.flap_s:
            self.flaps += 1
            if self.flaps >= self.flap_limit:
                self._harden()
        else:
            self.flaps = 0
        d = self.first_delay()
        if self.attempt == 0 and not self.hard:
            # Nothing failed since the last reset: a plain first-window draw, as after a
            # stable connection. max(d, next_delay()) would squeeze the wave into
            # [first_window/2, first_window]; counting the attempt keeps growth for the next.
            self.attempt = 1
            return d
        n = self.next_delay()
        return n if n > d else d

    def _harden(self):
        if not self.hard:
            self.hard = True
            self.attempt = 0


class Fixed:
    """The same delay every time, no jitter, no first window: only the "baseline" profile
    uses it, to reproduce the common fixed-retry client in storm comparisons. Carries the
    attributes the client and the app read or set, so both work with it unchanged."""

    def __init__(self, delay):
        self.delay = delay
        self.base = self.cap = self.first_window = delay
        self.stable_s = 30.0
        self.flap_s = 10.0
        self.attempt = 0
        self.floor = 0.0
        self.hard = False

    def first_delay(self):
        return self.delay

    def next_delay(self):
        self.attempt += 1
        return self.delay

    def refused(self, rc):
        pass

    def dropped(self, seconds):
        return self.delay


def jittered(period, rnd, low=0.5, high=1.5):
    """A period scaled by uniform(low, high): repeated schedules drift apart across devices."""
    return period * rnd.uniform(low, high)
