# Battery boards (README "Battery devices"): a life lived in wakes. Each wake takes a reading;
# every `send_every`th one (or one with something owed) connects with the kept session,
# delivers everything queued, takes what the broker queued for the device while it slept,
# says `sleeping` and when it wakes next, and deep-sleeps: one round trip for CONNACK, one for
# the PUBACKs, no SUBSCRIBE. The state of the wakes (the boot they belong to, the readings not
# sent yet, the schedules) lives where a deep sleep keeps it: the RTC's memory, or a flash
# file on a board without one.
import asyncio
import struct
from binascii import crc32

from micropython import const

from outbox import record

_MAGIC = b"DUT1"
# magic | crc32 of what follows it | boot | seq | wakes | fails | flags | refresh at | health at
_HDR = "<4sIIIIHHII"
_HDR_LEN = const(32)
_FLASH_PATH = "/sleep.bin"
_FLASH_SIZE = const(2048)  # as an ESP32's RTC memory: the same wake on every board
# flags
STABLE = const(1)  # this boot's record on flash says stable (one write per boot)
REPORTED = const(2)  # config/reported went out in this boot
# Saved with the state at each sleep, cleared at each wake: a reset that finds it set ended a
# sleep (an RP2040's deep sleep ends in a watchdog reset), one that does not is a hang's.
SLEEPING = const(4)
# The jitter of a wake's period: phases drift apart, so a fleet powered on at once does not
# stay in step.
_JITTER = 0.1
_LATE_WAKES = 64  # at most this many wakes between refreshes (or health reports)
# An update keeps a wake awake this long at most (or power.stay_awake_s if longer): one that
# is still not done then goes on at the next sending wake (downloads resume).
_OTA_AWAKE_S = 900


class SleepState:
    """What one wake leaves the next: a header and the readings not yet sent, as outbox
    records (lib/outbox/record.py, topic left out). `mem`: the board's sleep memory, or None
    for a flash file (counted in `flash_writes`, which is what it costs)."""

    def __init__(self, mem, fs):
        self.mem = mem
        self.fs = fs
        self.size = mem.size if mem is not None else _FLASH_SIZE
        self.boot = self.seq = self.wakes = self.fails = self.flags = 0
        self.refresh_at = self.health_at = 0
        self.recs = bytearray()
        self.flash_writes = 0

    def load(self):
        """True if a whole state was there (not after a power cut, on RTC memory)."""
        try:
            if self.mem is not None:
                b = self.mem.read()
            else:
                with self.fs.open(_FLASH_PATH, "rb") as f:
                    b = f.read()
        except OSError:
            return False
        if len(b) < _HDR_LEN or b[:4] != _MAGIC:
            return False
        h = struct.unpack_from(_HDR, b, 0)
        if crc32(memoryview(b)[8:]) != h[1]:
            return False
        (_, _, self.boot, self.seq, self.wakes, self.fails, self.flags, self.refresh_at,
         self.health_at) = h
        self.recs = bytearray(memoryview(b)[_HDR_LEN:])
        return True

    def save(self):
        b = bytearray(_HDR_LEN + len(self.recs))
        b[_HDR_LEN:] = self.recs
        struct.pack_into(_HDR, b, 0, _MAGIC, 0, self.boot, self.seq, self.wakes, self.fails,
                         self.flags, self.refresh_at, self.health_at)
        struct.pack_into("<I", b, 4, crc32(memoryview(b)[8:]))
        if self.mem is not None:
            self.mem.write(b)
            return
        from firmware.bootlog import write_atomic

        write_atomic(self.fs, _FLASH_PATH, b)
        self.flash_writes += 1

    def clear(self):
        """No state at all (the board no longer lives in wakes)."""
        self.recs = bytearray()
        if self.mem is not None:
            self.mem.write(b"")
            return
        try:
            self.fs.remove(_FLASH_PATH)
        except OSError:
            pass  # not there

    def fits(self, payload):
        return _HDR_LEN + len(self.recs) + record.size(b"", payload) <= self.size

    def add(self, payload, boot, seq):
        if isinstance(payload, str):
            payload = payload.encode()
        n = len(self.recs)
        self.recs.extend(bytes(record.size(b"", payload)))
        record.encode_into(self.recs, n, b"", payload, boot, seq)

    def records(self):
        """(payload, boot, seq) of each kept reading, oldest first."""
        mv = memoryview(self.recs)
        off = 0
        while off < len(mv):
            n = record.check(mv, off, len(mv))
            if n <= 0:
                break  # not written whole: what follows cannot be trusted
            _, p, boot, seq = record.fields(mv, off)
            yield bytes(p), boot, seq
            off += n

    def into(self, outbox, topic):
        """Every kept reading into the outbox, oldest first (they stay kept here too)."""
        for p, boot, seq in self.records():
            outbox.put(topic, p, boot, seq)


def load_state(board):
    st = SleepState(board.sleep_memory, board.fs)
    return st if st.load() else None


class DutyCycle:
    """One wake of the device `dev` (firmware/app.py Device, built for this boot)."""

    def __init__(self, dev, state):
        self.dev = dev
        self.st = state
        self.acked = asyncio.Event()  # set by the device at each PUBACK
        self.awake_until = None  # uptime s: stay awake until then (the fleet asked)
        self.next_s = None  # the sleep this wake plans, said in its status
        self._overflow = False  # readings in the outbox's RAM only: this wake must send
        self._first = False  # the first wake of a boot

    def power(self, key):
        return self.dev.sync.twin.effective()["power." + key]

    def _interval_wakes(self, interval_s):
        """Wakes until the next refresh or health report: the interval in wakes, at a
        random point of [T/2, 3T/2] so a fleet asks at different wakes."""
        n = interval_s / self.power("wake_every_s")
        w = int(n * self.dev.rnd.uniform(0.5, 1.5)) + 1
        return self.st.wakes + (w if w < _LATE_WAKES else _LATE_WAKES)

    def stay_awake(self, s):
        """The fleet needs the device awake for s seconds from now (a command, an update)."""
        until = self.dev._uptime() + s
        if self.awake_until is None or until > self.awake_until:
            self.awake_until = until

    async def run(self):
        dev = self.dev
        try:
            await self._wake()
        except Exception as e:  # a fault in this wake must not keep the board awake
            dev.log("E", "wake %d failed: %r" % (self.st.wakes, e))
            self.spill()
            try:
                await self._leave(None)
            except Exception:  # noqa: BLE001 - asleep is better than stuck
                pass
            await self._sleep(self.power("wake_every_s") * dev.rnd.uniform(0.5, 1.5))

    async def _wake(self):
        dev = self.dev
        st = self.st
        tel = dev.telemetry
        eff = dev.sync.twin.effective()
        new_boot = self._first = st.boot != dev.boot
        if new_boot:
            # A new boot (power-on, watchdog, update): its readings carry its number and
            # count from 1; the kept ones of the old boot still go out under theirs.
            st.boot = dev.boot
            st.seq = st.flags = 0
            st.refresh_at = self._interval_wakes(eff["refresh_interval"])
            st.health_at = self._interval_wakes(eff["health_interval"])
        st.wakes += 1
        if st.flags & SLEEPING:
            st.flags &= ~SLEEPING
            if st.mem is None:
                self._save()  # on flash: or a hang in this wake would pass for a sleep
        dev._reported_once = bool(st.flags & REPORTED)
        period = self.power("wake_every_s")
        refresh = st.wakes >= st.refresh_at
        health = st.wakes >= st.health_at
        stay = self.power("stay_awake_s")
        send = (new_boot or st.fails or refresh or health or stay or dev.ota_requested()
                or st.wakes % self.power("send_every") == 0)
        tel.seq = st.seq
        tel.publish = self._keep
        await tel.take()
        st.seq = tel.seq
        if not send and not self._overflow:
            return await self._sleep(self._period(period, new_boot))
        if stay:
            self.stay_awake(stay)
        dev.wake_network()
        # The kept readings, this wake's the newest, after those on flash (older). Each
        # leaves the sleep memory only at its PUBACK (on_ack): a reset in the middle of the
        # wake sends none of them twice and loses none (RTC memory; on flash, what was
        # acknowledged since the wake began may go out again).
        ob = dev.outbox
        st.into(ob, dev.topics.telemetry)
        if ob.policy == "always" or len(st.recs) > len(ob.ring.buf):
            # The outbox put them (some) on flash itself: then flash holds them, not both.
            ob.spill()
            st.recs = bytearray()
        dev.kick()
        self._save()
        budget = self.power("awake_max_s")
        try:
            await asyncio.wait_for(self._deliver(refresh, health), budget)
            ok = True
        except asyncio.TimeoutError:
            ok = False
        if ok:
            await self._stay()
            st.fails = 0
            if refresh:
                st.refresh_at = self._interval_wakes(eff["refresh_interval"])
            if health:
                st.health_at = self._interval_wakes(eff["health_interval"])
            if dev._reported_once:
                st.flags |= REPORTED
            if not st.flags & STABLE:
                # A boot that delivered is a good boot: a later hang starts no crash loop.
                st.flags |= STABLE
                dev._save_uptime(stable=True)
            await self._leave(None)
            sleep_s = self.next_s
        else:
            st.fails = min(st.fails + 1, 1000)
            # A fleet that failed together must not come back together: the next attempt
            # at a random point of [T/2, 3T/2].
            sleep_s = period * dev.rnd.uniform(0.5, 1.5)
            dev.log("W", "wake %d: not delivered within %d s (%d failed wakes in a row); "
                         "sleeping %.2f s" % (st.wakes, budget, st.fails, sleep_s))
            self.spill()
            await self._leave((dev.topics.status, self.status(sleep_s), True))
        await self._sleep(sleep_s)

    def spill(self):
        """Before a sleep or a reset: readings that are in no sleep memory go to flash;
        the kept ones stay where they are (copying them to flash too would send them
        twice)."""
        if self._overflow:
            self.dev.outbox.spill()

    async def _leave(self, final):
        """DISCONNECT (no last will), after `final` if connected; then wait a moment for
        the broker's close, so the radio does not go off with the DISCONNECT still in the
        network stack's buffers."""
        c = self.dev.client
        self.dev._beat("wake", int(c.timeout * 1000) + 2000)
        await c.disconnect(final if c.is_connected() else None, linger=min(1.0, c.timeout))

    def on_ack(self, key):
        """A PUBACK for the outbox record `key` (boot, seq): a kept reading leaves the
        sleep memory (they are acknowledged in order, the oldest kept first)."""
        st = self.st
        if not st.recs:
            return
        mv = memoryview(st.recs)
        if tuple(record.key(mv, 0)) != tuple(key):
            return  # one from the flash ring
        n = record.check(mv, 0, len(mv))
        st.recs = st.recs[n:] if n > 0 else bytearray()
        if st.mem is not None:
            self._save()  # RAM: cheap; on flash it waits for the sleep (wear)

    def _keep(self, topic, payload, boot, seq):
        """Telemetry's queue in a wake: the reading joins the kept ones. When they fill the
        sleep memory, all of them go to the outbox's flash ring, oldest first, after what
        is there already; if flash fails too, this wake sends them from RAM."""
        st = self.st
        if st.fits(payload):
            st.add(payload, boot, seq)
            return
        ob = self.dev.outbox
        st.into(ob, topic)
        st.recs = bytearray()
        ob.put(topic, payload, boot, seq)
        if not ob.spill():
            self.dev.log("E", "wake: the kept readings could not go to flash: sending them")
            self._overflow = True

    def _period(self, period, first=False):
        """The next sleep: the period, jittered; after a boot's first wake anywhere in
        [T/2, 3T/2], so that a fleet powered on together (a site's mains back) wakes
        spread from then on."""
        j = 0.5 if first else _JITTER
        return period * self.dev.rnd.uniform(1 - j, 1 + j)

    def status(self, sleep_s, state="sleeping"):
        d = self.dev
        # seq: the last reading taken; one not delivered by the next boot was lost (a power
        # cut takes the RTC memory), and the consumer can tell.
        extra = {"wake": self.st.wakes, "sleep_s": int(sleep_s + 0.5), "seq": self.st.seq}
        ts = d.board.unix_time()
        if ts is not None and state == "sleeping":
            extra["next_wake"] = round(ts + sleep_s)
        if self.st.mem is None:
            extra["state_flash_writes"] = self.st.flash_writes
        return d._status(state, d.client.outage, extra)

    async def _deliver(self, refresh, health):
        """Connected, everything queued acknowledged, the broker's queued messages taken."""
        dev = self.dev
        c = dev.client
        ob = dev.outbox
        # Every reading handed to the session before the connection is up, then the
        # status: the connect's resume sends them as one flight (client.nodelay), and the
        # status's PUBACK comes after whatever the broker queued for us while we slept.
        while ob.inflight < len(ob) and not c.session.full():
            await asyncio.sleep_ms(0)  # the drain task's turn
        self.next_s = self._period(self.power("wake_every_s"), self._first)
        if not refresh:
            await c.publish(dev.topics.status, self.status(self.next_s), 1, True,
                            wait=False, token="birth")
        await c.connected.wait()
        if refresh:
            # The retained layers come after the SUBACK; the status, sent after it, is
            # acknowledged after them (one connection is one ordered stream).
            await dev.sync.refresh()
            await c.publish(dev.topics.status, self.status(self.next_s), 1, True,
                            wait=False, token="birth")
        if health:
            await dev.health.publish()
        await self._settled()

    async def _settled(self):
        c = self.dev.client
        while len(c.session) or len(self.dev.outbox):
            self.acked.clear()
            await self.acked.wait()

    def _left(self, ota_until):
        """Seconds the wake must stay awake from now: the fleet's ask, or an update."""
        dev = self.dev
        now = dev._uptime()
        left = self.awake_until - now if self.awake_until is not None else 0
        if dev.ota is not None and ota_until - now > left:
            left = ota_until - now
        return left

    async def _stay(self):
        """Awake for as long as the fleet asked (a command, power.stay_awake_s) or an update
        is under way (one a layer asked for, or a new version on trial), online."""
        dev = self.dev
        c = dev.client
        ota_until = dev._uptime() + max(self.power("stay_awake_s"), _OTA_AWAKE_S)
        left = self._left(ota_until)
        if left <= 0:
            return
        dev.log("I", "staying awake up to %.0f s%s" % (
            left, " for the update" if dev.ota is not None else ""))
        await c.publish(dev.topics.status, dev._status("online", None, {"awake_s": round(left)}),
                        1, True, wait=False)
        while left > 0:
            dev._beat("wake", 2000)
            await asyncio.sleep(min(left, 1))
            left = self._left(ota_until)
        self.next_s = self._period(self.power("wake_every_s"))
        dev._beat("wake", int(c.timeout * 1000) + 2000)
        try:
            await c.publish(dev.topics.status, self.status(self.next_s), 1, True,
                            wait=False)
            await asyncio.wait_for(self._settled(), c.timeout)
        except (OSError, asyncio.TimeoutError) as e:
            # The link went while awake: what was not acknowledged stays kept.
            dev.log("W", "wake %d: status after staying awake not acknowledged: %r"
                    % (self.st.wakes, e))

    def _save(self):
        try:
            self.st.save()
        except OSError as e:
            self.dev.log("E", "wake state not saved: %r" % (e,))

    async def _sleep(self, s):
        self.st.flags |= SLEEPING
        self._save()
        await self.dev.deep_sleep(int(s * 1000))
