# Flash tier of the outbox: an append-only log of segment files on a littlefs filesystem
# (/outbox.d/00000001.q, ...), oldest first. Records (record.py) are appended in batches, so a
# batch costs whole-block writes rather than a rewrite per message; a segment file is removed
# once every record in it was consumed. Appends made after a recovery start a new segment, so
# a torn tail left by a power cut is never written behind.
#
# Recovery reads every segment once, keeps the valid records in order and skips (and counts)
# bytes that are not a valid record; it is bounded by the bytes on flash.
from micropython import const

from outbox import record

_NAME_DIGITS = const(8)
# Not a name Python can import: a board's sys.path starts with '' (the root of its flash),
# so a directory /outbox there was taken for the package `outbox` (as a namespace package)
# and the firmware's next boot failed with "no module named 'outbox.outbox'".
# (The loader moves an earlier version's /outbox here: otaboot.load.)
DIRECTORY = "/outbox.d"


def _name(directory, num):
    s = str(num)
    return "%s/%s%s.q" % (directory, "0" * (_NAME_DIGITS - len(s)), s)


class Segment:
    __slots__ = ("num", "size", "end", "count", "first", "last")

    def __init__(self, num):
        self.num = num
        self.size = 0  # bytes in the file
        # Where its counted records end: a failed append can leave part of a batch after
        # this, which is not read back until a recovery counts it (at least once).
        self.end = 0
        self.count = 0  # valid records in it
        self.first = None  # (boot, seq) of its first and last record
        self.last = None


class FlashLog:
    def __init__(self, fs, capacity=262144, segment=32768, directory=DIRECTORY,
                 max_record=1024):
        self.fs = fs
        self.capacity = capacity
        self.segment = segment
        self.dir = directory
        self.segs = []  # Segment, oldest first
        self.count = 0  # records held (consumed ones excluded)
        self.nbytes = 0  # bytes of segment files
        self.corrupt = 0  # stretches of bytes skipped because they were not a valid record
        self.head = 0  # offset of the oldest unconsumed record in segs[0]
        self._buf = bytearray(max_record)
        self._mv = memoryview(self._buf)
        self._fresh = True  # next append opens a new segment

    # ---- recovery ------------------------------------------------------------------

    def recover(self):
        """Rebuild the index from the files on flash; returns the number of records."""
        self.segs = []
        self.count = self.nbytes = self.corrupt = self.head = 0
        self._fresh = True
        try:
            names = sorted(e[0] for e in self.fs.ilistdir(self.dir) if e[0].endswith(".q"))
        except OSError:
            self.fs.mkdir(self.dir)
            names = []
        for name in names:
            try:
                num = int(name[:-2])
            except ValueError:
                continue
            seg = Segment(num)
            for off, n in self._scan(seg.num, 0, None):
                k = record.key(self._mv, 0)
                if seg.first is None:
                    seg.first = k
                seg.last = k
                seg.count += 1
            seg.size = seg.end = self._size(num)
            if seg.count:
                self.segs.append(seg)
                self.count += seg.count
                self.nbytes += seg.size
            else:
                self._remove(num)
        return self.count

    def _size(self, num):
        try:
            return self.fs.stat(_name(self.dir, num))[6]
        except OSError:
            return 0

    def _scan(self, num, start, end):
        """Yield (offset, length) of each valid record from start up to end (None: the end
        of the file); the record's bytes are in self._buf when yielded. Skips and counts
        what is not a record, resynchronising on the next magic byte."""
        mv = self._mv
        try:
            f = self.fs.open(_name(self.dir, num), "rb")
        except OSError:
            return
        try:
            off = start
            bad = False
            while end is None or off < end:
                f.seek(off)
                got = f.readinto(mv[: record.HEADER])
                if not got:
                    break
                r = record.check(mv, 0, got)
                if r == record.NEED_MORE and got == record.HEADER:
                    n = record.HEADER + mv[1] + (mv[2] | (mv[3] << 8))
                    if n <= len(mv):
                        body = f.readinto(mv[record.HEADER : n]) or 0
                        r = record.check(mv, 0, record.HEADER + body)
                    else:
                        r = record.CORRUPT
                if r > 0 and (end is None or off + r <= end):
                    bad = False
                    yield off, r
                    off += r
                    continue
                # Not a record here: corrupt bytes, a length damaged so that the record
                # seems to run past the end of the file, or a torn tail. Resynchronise:
                # valid records may follow.
                if not bad:
                    self.corrupt += 1
                    bad = True
                # Resynchronise on the next byte that could start a record.
                step = 1
                while step < got and mv[step] != record.MAGIC:
                    step += 1
                off += step
        finally:
            f.close()

    # ---- writing -------------------------------------------------------------------

    def append(self, batch, count, first, last):
        """Append `count` whole records (bytes-like `batch`, keys first..last) in one write.
        Returns (segment number, offset) where the batch starts, or False when it does not
        fit in the capacity. A write error (the filesystem full, a failing flash) raises
        OSError, with the index still true to the files."""
        n = len(batch)
        if self.nbytes + n > self.capacity:
            return False
        seg = self.segs[-1] if self.segs and not self._fresh else None
        if seg is None or seg.size + n > self.segment:
            num = self.segs[-1].num + 1 if self.segs else 1
            seg = Segment(num)
            new = True
        else:
            new = False
        try:
            with self.fs.open(_name(self.dir, seg.num), "ab") as f:
                f.write(batch)
        except OSError:
            if new:
                self._remove(seg.num)
            else:
                # The file may hold part of the batch now (after seg.end, so unread):
                # close the segment for appends.
                self._fresh = True
                seg.size = self._size(seg.num)
            raise
        if new:
            self.segs.append(seg)
            self._fresh = False
        if seg.first is None:
            seg.first = first
        at = (seg.num, seg.size)
        seg.last = last
        seg.size += n
        seg.end = seg.size
        seg.count += count
        self.count += count
        self.nbytes += n
        return at

    # ---- reading and consuming -----------------------------------------------------

    def read(self, seg_index, off):
        """The record at or after `off` in segs[seg_index]: (offset, length) with its bytes
        in self.buf(), or None at the end of that segment."""
        seg = self.segs[seg_index]
        scan = self._scan(seg.num, off, seg.end)
        try:
            for o, n in scan:
                return o, n
            return None
        finally:
            # Closed now, not by the collector: a return inside the loop leaves the
            # generator suspended with its file open (two per drained message, each
            # holding littlefs's cache, until a collect finalised them).
            scan.close()

    def buf(self):
        return self._mv

    def consume(self, r=None):
        """The oldest record was delivered: forget it, and its segment once empty.
        r: its (offset, length) when the caller has just read it."""
        seg = self.segs[0]
        if r is None:
            r = self.read(0, self.head)
        seg.count -= 1
        self.count -= 1
        self.head = r[0] + r[1] if r else seg.end
        if seg.count <= 0:
            self._drop(0)

    def drop_oldest_segment(self):
        """Overflow: remove the oldest segment whole; returns (records, first, last)."""
        seg = self.segs[0]
        first = seg.first
        if self.head:
            r = self.read(0, self.head)
            first = record.key(self._mv, 0) if r else seg.last
        out = (seg.count, first, seg.last)
        self.count -= seg.count
        self._drop(0)
        return out

    def _drop(self, i):
        seg = self.segs.pop(i)
        self.nbytes -= seg.size
        self._remove(seg.num)
        if i == 0:
            self.head = 0
        if not self.segs:
            self._fresh = True

    def _remove(self, num):
        try:
            self.fs.remove(_name(self.dir, num))
        except OSError:
            pass
