# Observability: the last log lines in a bounded RAM ring (for the `logs` command), the loop
# lag watch, and the health document published on devices/{id}/health on a jittered period.
import asyncio
import json
import time

from backoff import jittered
from firmware.version import SCHEMA

LOG_LINES = 40
LOG_LINE_MAX = 160


class LogRing:
    """The most recent log lines, oldest first, in one buffer allocated at boot: its memory
    is the same from the first line on, however much is logged (a heap soak sees no growth
    while it fills). A line longer than `width` bytes is cut at a character boundary."""

    def __init__(self, size=LOG_LINES, width=LOG_LINE_MAX):
        self.buf = bytearray(size * width)
        self.lens = bytearray(size)  # width <= 255
        self.size = size
        self.width = width
        self.at = 0
        self.total = 0

    def add(self, line):
        b = line.encode()
        n = len(b)
        if n > self.width:
            n = self.width
            while n and b[n] & 0xC0 == 0x80:  # not inside a UTF-8 sequence
                n -= 1
        off = self.at * self.width
        self.buf[off:off + n] = memoryview(b)[:n]
        self.lens[self.at] = n
        self.at = (self.at + 1) % self.size
        self.total += 1

    def last(self, n):
        size = self.size
        n = min(n, size, self.total)
        mv = memoryview(self.buf)
        out = []
        for i in range(n):
            k = (self.at - n + i) % size
            off = k * self.width
            out.append(str(mv[off:off + self.lens[k]], "utf-8"))
        return out


class Health:
    def __init__(self, device, interval, rnd):
        self.device = device
        self.interval = interval  # fn() -> seconds
        self.rnd = rnd
        self.lag_max_ms = 0  # worst scheduling delay seen since the last report
        self.sent = 0

    async def watch_lag(self, period_ms=100):
        """A loop that sleeps period_ms and measures how late it wakes: a blocking call
        anywhere in the firmware shows up here."""
        ticks = self.device.board.ticks_ms
        while True:
            t = ticks()
            await asyncio.sleep_ms(period_ms)
            late = time.ticks_diff(ticks(), t) - period_ms
            if late > self.lag_max_ms:
                self.lag_max_ms = late

    def document(self):
        d = self.device
        free, alloc, largest = d.board.heap()
        c = d.client.stats
        sup = d.sup
        rec = d.bootrec
        doc = {
            "v": SCHEMA,
            "boot": d.boot,
            "up": d.board.uptime_ms() // 1000,
            "reset_cause": rec.get("cause"),
            "prev_up_s": rec.get("prev_up_s"),
            "safe_mode": d.safe,
            "heap_free": free,
            "heap_alloc": alloc,
            "heap_largest_free": largest,
            "loop_lag_max_ms": self.lag_max_ms,
            "tasks": {"restarts": sup.restarts(), "unhandled": sup.stats["unhandled"],
                      "watchdog_starved": sup.stats["starved"]},
            "link": d.link.stats,
            "mqtt": {k: c[k] for k in ("connects", "connect_failures", "tls_failures",
                                       "refusals", "last_refusal", "flaps",
                                       "protocol_errors", "keepalive_timeouts", "resends",
                                       "pings")},
            "outbox": {"queued": len(d.outbox), "dropped": d.outbox.stats["dropped"],
                       "flash_errors": d.outbox.stats["flash_errors"],
                       "drops": d.outbox.drops[-4:]},
            "config": {"rejected": d.sync.twin.rejected, "refreshes": d.sync.refreshes},
            "commands": {"handled": d.commands.handled, "rejected": d.commands.rejected,
                         "duplicates": d.commands.duplicates},
        }
        if d.timesync:
            doc["ntp"] = d.timesync.stats
        rssi = d.board.link.rssi()
        if rssi is not None:
            doc["rssi"] = rssi
        ts = d.board.unix_time()
        if ts is not None:
            doc["ts"] = ts
        return json.dumps(doc)

    async def publish(self):
        c = self.device.client
        if not c.is_connected():
            return False  # health is about now: not queued while offline
        await c.publish(self.device.topics.health, self.document(), 1, False, wait=False)
        self.lag_max_ms = 0
        self.sent += 1
        return True

    async def run(self):
        await asyncio.sleep(self.rnd.uniform(0, self.interval()))
        while True:
            await self.publish()
            await asyncio.sleep(jittered(self.interval(), self.rnd))
