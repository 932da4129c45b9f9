# The outbox's record: one message as kept in RAM or on flash, self-checking so that
# recovery tells a whole record from a torn or corrupt one. Pure functions over buffers.
#   magic u8 | topic length u8 | payload length u16 | boot u32 | seq u32 | crc32 u32 | topic | payload
# The CRC covers the first 12 header bytes, the topic and the payload (little endian).
import struct
from binascii import crc32

from micropython import const

MAGIC = const(0xA7)
HEADER = const(16)
MAX_TOPIC = const(255)
MAX_PAYLOAD = const(65535)
NEED_MORE = const(0)  # check(): the buffer ends before the record does
CORRUPT = const(-1)  # check(): no valid record starts here


def size(topic, payload):
    return HEADER + len(topic) + len(payload)


def encode_into(buf, off, topic, payload, boot, seq):
    """Write a record at buf[off:]; return the offset after it. buf: a bytearray or a
    memoryview of one (the ring passes its own: no view of the whole buffer per call)."""
    tl = len(topic)
    pl = len(payload)
    if tl > MAX_TOPIC or pl > MAX_PAYLOAD:
        raise ValueError("record too large")
    struct.pack_into("<BBHII", buf, off, MAGIC, tl, pl, boot, seq)
    end = off + HEADER + tl + pl
    mv = buf if type(buf) is memoryview else memoryview(buf)
    # Stores go into the record's own view: a slice store also moves every byte after
    # the slice to its end (MicroPython), here only the record's, not the whole buffer's.
    rec = mv[off:end]
    rec[HEADER + tl :] = payload  # first: nothing after it to move
    rec[HEADER : HEADER + tl] = topic
    crc = crc32(rec[HEADER:], crc32(rec[:12]))
    struct.pack_into("<I", buf, off + 12, crc)
    return end


def check(mv, off, end):
    """Length of the valid record at mv[off:end]; NEED_MORE if it may continue past end;
    CORRUPT if the bytes at off are not a record (bad magic or checksum)."""
    if end - off < HEADER:
        return NEED_MORE if end - off < 1 or mv[off] == MAGIC else CORRUPT
    if mv[off] != MAGIC:
        return CORRUPT
    n = HEADER + mv[off + 1] + (mv[off + 2] | (mv[off + 3] << 8))
    if off + n > end:
        return NEED_MORE
    crc = struct.unpack_from("<I", mv, off + 12)[0]
    if crc32(mv[off + HEADER : off + n], crc32(mv[off : off + 12])) != crc:
        return CORRUPT
    return n


def fields(mv, off):
    """(topic, payload, boot, seq) of the valid record at off; topic and payload are views."""
    _, tl, pl, boot, seq = struct.unpack_from("<BBHII", mv, off)
    o = off + HEADER
    return mv[o : o + tl], mv[o + tl : o + tl + pl], boot, seq


def key(mv, off):
    """(boot, seq) of the record at off."""
    return struct.unpack_from("<II", mv, off + 4)
