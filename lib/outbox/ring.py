# RAM tier of the outbox: records (see record.py) in one preallocated bytearray, oldest
# first, bounded in bytes, with no allocation per message. A record never wraps around the
# end of the buffer: when it does not fit there, the data of this lap ends at `_end` and the
# record goes to offset 0.
from outbox import record


class Ring:
    def __init__(self, capacity):
        self.buf = bytearray(capacity)
        self.mv = memoryview(self.buf)
        self.clear()

    def clear(self):
        self.head = 0  # offset of the oldest record
        self.tail = 0  # where the next record goes
        self._end = len(self.buf)
        self._wrapped = False  # data is [head, _end) + [0, tail) rather than [head, tail)
        self.count = 0
        self.nbytes = 0  # bytes of records held (not counting the gap before a wrap)

    def __len__(self):
        return self.count

    def fits(self, n):
        """True if a record of n bytes can be put now."""
        if self._wrapped:
            return self.tail + n <= self.head
        return self.tail + n <= len(self.buf) or n <= self.head or self.count == 0

    def put(self, topic, payload, boot, seq):
        """Append a record; False (and nothing changed) when it does not fit."""
        n = record.size(topic, payload)
        if n > len(self.buf):
            raise ValueError("record larger than the ring")
        if self.count == 0:
            self.clear()
        if not self.fits(n):
            return False
        if not self._wrapped and self.tail + n > len(self.buf):
            self._end = self.tail
            self.tail = 0
            self._wrapped = True
        record.encode_into(self.mv, self.tail, topic, payload, boot, seq)
        self.tail += n
        self.count += 1
        self.nbytes += n
        return True

    def length(self, off):
        mv = self.mv
        return record.HEADER + mv[off + 1] + (mv[off + 2] | (mv[off + 3] << 8))

    def after(self, off):
        """Offset of the record after the one at off (meaningless after the newest)."""
        o = off + self.length(off)
        if self._wrapped and o >= self._end and off >= self.head:
            return 0
        return o

    def pop(self):
        """Drop the oldest record; return its (boot, seq)."""
        if not self.count:
            raise IndexError("ring empty")
        k = record.key(self.mv, self.head)
        n = self.length(self.head)
        self.nbytes -= n
        self.count -= 1
        if not self.count:
            self.clear()
            return k
        self.head += n
        if self._wrapped and self.head >= self._end:
            self.head = 0
            self._end = len(self.buf)
            self._wrapped = False
        return k

    def head_run(self):
        """(start, end, count, last) for the records from the head that lie contiguously in
        the buffer, up to the wrap: one write moves them all. last is the newest one's offset."""
        start = self.head
        end = self._end if self._wrapped else self.tail
        o = start
        last = start
        count = 0
        while o < end and count < self.count:
            last = o
            o += self.length(o)
            count += 1
        return start, o, count, last

    def offsets(self):
        """Offsets of the records, oldest first (a generator; for recovery and tests)."""
        off = self.head
        for _ in range(self.count):
            yield off
            off = self.after(off)
