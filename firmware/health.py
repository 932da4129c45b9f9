# Observability: the last log lines in a bounded RAM ring (for the `logs` command), the loop
# lag watch, and the health document published on devices/{id}/health on a jittered period.
import asyncio
import json

from backoff import jittered
from firmware.version import SCHEMA

LOG_BYTES = 1024
LOG_LINE_MAX = 160


class LogRing:
    """The most recent log lines, oldest first, packed (a length byte, then the text) into
    one circular buffer allocated at boot: its memory is the same from the first line on,
    however much is logged, and short lines leave room for more of them (1 KiB keeps about
    15 typical lines; fixed slots of the longest line kept a third as many in the same RAM).
    A line longer than `width` bytes is cut at a character boundary."""

    def __init__(self, size=LOG_BYTES, width=LOG_LINE_MAX):
        self.buf = bytearray(size)
        # Stores go into views that end where the line's bytes end: a slice store also moves
        # every byte after the slice to the end of what it stores into (MicroPython).
        self.mv = memoryview(self.buf)
        self.size = size
        self.width = min(width, 255, size - 1)  # the length must fit its byte
        self.head = 0  # offset of the oldest line's length byte
        self.used = 0
        self.count = 0
        self.total = 0

    def _put(self, off, data):
        size = self.size
        k = min(len(data), size - off)
        self.mv[off:off + k][:] = data[:k]
        if k < len(data):
            self.mv[:len(data) - k][:] = data[k:]

    def add(self, line):
        b = line.encode()
        n = len(b)
        if n > self.width:
            n = self.width
            while n and b[n] & 0xC0 == 0x80:  # not inside a UTF-8 sequence
                n -= 1
        size = self.size
        while size - self.used < n + 1:  # evict the oldest lines until this one fits
            k = self.buf[self.head] + 1
            self.head = (self.head + k) % size
            self.used -= k
            self.count -= 1
        off = (self.head + self.used) % size
        self.buf[off] = n
        self._put((off + 1) % size, memoryview(b)[:n])
        self.used += n + 1
        self.count += 1
        self.total += 1

    def last(self, n):
        size = self.size
        buf = self.buf
        skip = self.count - min(n, self.count)
        off = self.head
        out = []
        for i in range(self.count):
            k = buf[off]
            if i >= skip:
                a = (off + 1) % size
                b = a + k
                if b <= size:
                    out.append(str(memoryview(buf)[a:b], "utf-8"))
                else:
                    out.append(str(bytes(buf[a:]) + bytes(buf[:b - size]), "utf-8"))
            off = (off + 1 + k) % size
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
        board = self.device.board
        ticks = board.ticks_ms
        while True:
            t = ticks()
            await asyncio.sleep_ms(period_ms)
            late = board.ticks_diff(ticks(), t) - period_ms
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
            "up": d.board.uptime_s(),
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
                                       "pings", "sub_refusals",
                                       "oversized", "failovers", "failbacks",
                                       "tls_room_misses", "redirects", "server_disconnects",
                                       "puback_errors", "too_big", "downgrades")},
            "outbox": {"queued": len(d.outbox), "dropped": d.outbox.stats["dropped"],
                       "flash_errors": d.outbox.stats["flash_errors"],
                       "drops": d.outbox.drops[-4:]},
            "config": {"rejected": d.sync.twin.rejected, "refreshes": d.sync.refreshes},
            "commands": {"handled": d.commands.handled, "rejected": d.commands.rejected,
                         "duplicates": d.commands.duplicates,
                         "expired": d.commands.expired},
        }
        doc["mqtt"]["protocol"] = "5" if d.client.v5 else "3.1.1"
        if d.client.last_reason:
            doc["mqtt"]["last_reason"] = d.client.last_reason
        if len(d.client.endpoints) > 1:
            doc["mqtt"]["endpoint"] = d.client.ep
            doc["mqtt"]["broker"] = d.client.endpoint_name()
        if d.timesync:
            doc["ntp"] = d.timesync.stats
        if d.app:
            doc["app"] = d.app.health()
        doc["commands"]["errors"] = d.commands.errors
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
        # Urgent: a window held by messages the broker refuses must not hide that.
        await c.publish(self.device.topics.health, self.document(), 1, False, wait=False,
                        urgent=True)
        self.lag_max_ms = 0
        self.sent += 1
        return True

    async def run(self):
        await asyncio.sleep(self.rnd.uniform(0, self.interval()))
        while True:
            await self.publish()
            await asyncio.sleep(jittered(self.interval(), self.rnd))
