# The outbox: telemetry waits here until its PUBACK, through outages and reboots, within a
# bounded footprint. Two tiers, oldest records first: the flash log (older), then the RAM
# ring (newer). Records leave only when acknowledged, in order (MQTT-4.6.0-2: a broker
# acknowledges QoS 1 messages in the order it received them).
#
# Policies: "offline" (default) keeps records in RAM while acks flow, and moves every
# unacknowledged record to flash in one batch when no ack came for `spill_ms` or the link is
# down, or when RAM is full; "always" puts each record on flash before put() returns.
# Overflow drops the oldest records (or, with overflow="newest", refuses the new one); every
# drop is counted with the (boot, seq) range it removed.
from outbox import record
from outbox.flashlog import DIRECTORY, FlashLog
from outbox.ring import Ring

_RETRY_FLASH_MS = 60000
_MAX_RANGES = 8


class Outbox:
    def __init__(self, fs=None, ram_bytes=4096, flash_bytes=262144, segment=32768,
                 policy="offline", overflow="oldest", spill_ms=1000, ticks_ms=None,
                 ticks_diff=None, log=None, directory=DIRECTORY, topic=b"", block=4096,
                 max_record=1024):
        if policy not in ("offline", "always") or overflow not in ("oldest", "newest"):
            raise ValueError("policy is offline|always, overflow is oldest|newest")
        self.ring = Ring(ram_bytes)
        # Records are at most max_record bytes (header included), so flash reads need a
        # buffer of that size only; put() refuses larger ones.
        self.max_record = max_record
        self.flash = (FlashLog(fs, flash_bytes, segment, directory, max_record)
                      if fs is not None else None)
        self.policy = policy
        self.overflow = overflow
        # Records on this topic store none (topic length 0): for telemetry, the topic would
        # otherwise be a third of every record written to flash.
        self.topic = topic.encode() if isinstance(topic, str) else topic
        self.block = block
        self.spill_ms = spill_ms
        self.ticks_ms = ticks_ms
        self.ticks_diff = ticks_diff
        self.log = log or (lambda level, msg: None)
        self._dropping = False  # in a stretch of drops (logged at its start)
        self.inflight = 0  # records from the head handed to the session, not yet acked
        self._fcur = None  # (segment number, offset) of the next flash record to hand over
        self._rcur = 0  # ring offset of the next ring record to hand over
        self._flen = 0  # length of the flash record next() returned
        self._progress = 0  # ticks of the last ack, or of the first record after an idle spell
        self._ring_since = 0  # ticks when the ring last went from empty to holding a record
        self._flash_down_at = None  # ticks when flash failed; retried after a minute
        self.stats = {"put": 0, "acked": 0, "dropped": 0, "spilled": 0, "flash_errors": 0,
                      "stale_acks": 0, "recovered": 0, "corrupt": 0}
        self.drops = []  # last few (boot, first seq, last seq, count), newest last

    # ---- state -----------------------------------------------------------------------

    def __len__(self):
        return self._fcount() + self.ring.count

    def _fcount(self):
        return self.flash.count if self.flash else 0

    def recover(self):
        """At boot: the records left on flash become the oldest of the outbox."""
        if not self.flash:
            return 0
        try:
            n = self.flash.recover()
        except OSError as e:
            self._flash_failed(e)
            return 0
        self.stats["recovered"] = n
        self.stats["corrupt"] = self.flash.corrupt
        self.inflight = 0
        self._fcur = (self.flash.segs[0].num, self.flash.head) if n else None
        if self.flash.corrupt:
            self.log("W", "outbox: skipped %d corrupt stretch(es) on flash" % self.flash.corrupt)
        return n

    def _flash_ok(self):
        if self.flash is None:
            return False
        if self._flash_down_at is None:
            return True
        # A negative difference is a stamp older than ticks_diff spans (6.2 days on a board).
        d = self.ticks_diff(self.ticks_ms(), self._flash_down_at)
        if d >= _RETRY_FLASH_MS or d < 0:
            self._flash_down_at = None
            return True
        return False

    def _flash_failed(self, e):
        self.stats["flash_errors"] += 1
        self._flash_down_at = self.ticks_ms()
        self.log("E", "outbox: flash write failed (%r); RAM only for a minute" % (e,))

    # ---- producing -------------------------------------------------------------------

    def put(self, topic, payload, boot, seq):
        """Queue one message; never blocks. False if it was refused (overflow="newest",
        or a record that cannot be stored at all)."""
        self.stats["put"] += 1
        if isinstance(topic, str):
            topic = topic.encode()
        if isinstance(payload, str):
            payload = payload.encode()
        if topic == self.topic:
            topic = b""
        if not self.ring.count:
            self._ring_since = self.ticks_ms()
            if not self.inflight:
                self._progress = self._ring_since
        n = record.size(topic, payload)
        if n > len(self.ring.buf) or n > self.max_record:
            self.log("E", "outbox: message of %d bytes over the %d-byte record limit" % (
                n, min(len(self.ring.buf), self.max_record)))
            return self._refuse(boot, seq)
        while not self.ring.fits(n):
            # spill() makes room on flash itself (dropping its oldest segment when the
            # policy is "oldest"); with flash full under "newest", or flash down, RAM is all.
            if self._flash_ok() and self.spill():
                continue
            if self.overflow == "newest" or not self._drop_ram_oldest():
                return self._refuse(boot, seq)
        self.ring.put(topic, payload, boot, seq)
        if self.policy == "always":
            self.spill()  # on flash before put() returns (in RAM if flash fails)
        return True

    def _refuse(self, boot, seq):
        self._count_drop(1, (boot, seq), (boot, seq))
        return False

    def _append(self, batch, count, first, last):
        try:
            return self.flash.append(batch, count, first, last)
        except OSError as e:
            self._flash_failed(e)
            return None

    def _make_room(self):
        """Flash is full: drop its oldest segment if the policy allows."""
        if self.overflow == "newest" or not self.flash.segs:
            return False
        self._drop_flash_segment()
        return True

    # ---- spilling RAM to flash -------------------------------------------------------

    def spill(self):
        """Move every ring record to flash, one write per contiguous run (at most two).
        True if anything moved."""
        ring = self.ring
        moved = 0
        while ring.count and self._flash_ok():
            start, end, count, last = ring.head_run()
            r = self._append(ring.mv[start:end], count, record.key(ring.mv, start),
                             record.key(ring.mv, last))
            if r is None:
                break  # write error: stays in RAM
            if r is False:
                if not self._make_room():
                    break
                continue
            self._moved_to_flash(r, start, count)
            for _ in range(count):
                ring.pop()
            moved += count
        self.stats["spilled"] += moved
        return moved > 0

    def _moved_to_flash(self, where, ring_start, count):
        """Keep the send cursor on the same record after `count` ring records (from the
        ring's head at ring_start) went to flash at `where` = (segment, offset)."""
        before = self._fcount() - count  # flash records before this append
        if self.inflight >= before and self.inflight < before + count:
            # The next record to hand over is among those moved: find its flash offset.
            off = where[1]
            k = self.inflight - before
            o = ring_start
            for _ in range(k):
                n = self.ring.length(o)
                off += n
                o = self.ring.after(o)
            self._fcur = (where[0], off)

    # ---- overflow --------------------------------------------------------------------

    def _drop_ram_oldest(self):
        if not self.ring.count:
            return False
        head_in_flight = self.inflight > self._fcount()
        k = self.ring.pop()
        if head_in_flight:
            self.inflight -= 1  # its PUBACK will find nothing to remove: a stale ack
        self._count_drop(1, k, k)
        return True

    def _drop_flash_segment(self):
        seg_count = self.flash.segs[0].count
        num = self.flash.segs[0].num
        n, first, last = self.flash.drop_oldest_segment()
        gone_inflight = min(self.inflight, n)
        self.inflight -= gone_inflight
        if self._fcur is not None and self._fcur[0] == num:
            self._fcur = (self.flash.segs[0].num, 0) if self.flash.segs else None
        self._count_drop(seg_count, first, last)

    def _count_drop(self, n, first, last):
        if not self._dropping:
            # Once per stretch of drops (until an acknowledgement comes): the count is in
            # health, this says when it began.
            self._dropping = True
            self.log("W", "outbox: full, dropping the %s records (counted)" % self.overflow)
        self.stats["dropped"] += n
        self.drops.append((first[0], first[1], last[1], n))
        if len(self.drops) > _MAX_RANGES:
            self.drops.pop(0)

    # ---- draining --------------------------------------------------------------------

    def next(self):
        """(topic, payload, key) of the next record to hand to the session, copied, or None."""
        fc = self._fcount()
        if self.inflight < fc:
            num, off = self._fcur if self._fcur else (self.flash.segs[0].num, self.flash.head)
            i = self._seg_index(num)
            if i is None:  # its segment was consumed to the end and removed
                i, off = 0, self.flash.head
            r = self.flash.read(i, off)
            while r is None and i + 1 < len(self.flash.segs):
                i += 1
                r = self.flash.read(i, 0)
            if r is None:
                return None
            self._fcur = (self.flash.segs[i].num, r[0])
            self._flen = r[1]
            t, p, boot, seq = record.fields(self.flash.buf(), 0)
            return bytes(t) or self.topic, bytes(p), (boot, seq)
        j = self.inflight - fc
        if j >= self.ring.count:
            return None
        if j == 0:
            self._rcur = self.ring.head
        elif self.ring._wrapped and self._rcur >= self.ring._end:
            # It was saved as "just after the newest record", and the ring has wrapped to
            # 0 since: that offset is past the end of the lap.
            self._rcur = 0
        t, p, boot, seq = record.fields(self.ring.mv, self._rcur)
        return bytes(t) or self.topic, bytes(p), (boot, seq)

    def handed_over(self):
        """The record the last next() returned is now in flight (no await in between)."""
        if self.inflight < self._fcount():
            num, off = self._fcur
            self._fcur = (num, off + self._flen)
        else:
            self._rcur = self.ring.after(self._rcur)
        self.inflight += 1

    def _seg_index(self, num):
        for i, s in enumerate(self.flash.segs):
            if s.num == num:
                return i
        return None

    def ack(self, key):
        """PUBACK for the record with this (boot, seq): it leaves the outbox."""
        self._progress = self.ticks_ms()
        if self._fcount():
            r = self.flash.read(0, self.flash.head)
            if r and tuple(record.key(self.flash.buf(), 0)) == tuple(key):
                self.flash.consume(r)
                self._after_ack()
                return True
        elif self.ring.count and tuple(record.key(self.ring.mv, self.ring.head)) == tuple(key):
            self.ring.pop()
            self._after_ack()
            return True
        self.stats["stale_acks"] += 1  # dropped while in flight
        return False

    def _after_ack(self):
        self.stats["acked"] += 1
        self._dropping = False
        if self.inflight:
            self.inflight -= 1
        if not self._fcount():
            self._fcur = None

    def tick(self, connected):
        """Called every 250 ms or so. Under the offline policy, RAM records go to flash when
        the link is down or has not acknowledged anything for spill_ms: at once if a whole
        block's worth is waiting, else once the oldest has waited spill_ms. Batching to
        blocks keeps flash writes near the bytes of the records themselves."""
        if self.policy != "offline" or not self.ring.count:
            return
        now = self.ticks_ms()
        # Stamps older than ticks_diff spans (6.2 days on a board) come out negative.
        d = self.ticks_diff(now, self._ring_since)
        waited = d >= self.spill_ms or d < 0
        d = self.ticks_diff(now, self._progress)
        if connected and 0 <= d < self.spill_ms:
            # Acks flow, but maybe not for these: behind a backlog on flash or on a slow
            # link, RAM records can wait far longer than spill_ms. Once the oldest has,
            # it goes to flash all the same, or a power cut would take all of them.
            if waited:
                self.spill()
            return
        if self.ring.nbytes >= self.block or waited:
            self.spill()
