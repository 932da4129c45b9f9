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
    """Write a record at buf[off:]; return the offset after it."""
    tl = len(topic)
    pl = len(payload)
    if tl > MAX_TOPIC or pl > MAX_PAYLOAD:
        raise ValueError("record too large")
    struct.pack_into("<BBHII", buf, off, MAGIC, tl, pl, boot, seq)
    o = off + HEADER
    buf[o : o + tl] = topic
    buf[o + tl : o + tl + pl] = payload
    mv = memoryview(buf)
    crc = crc32(mv[o : o + tl + pl], crc32(mv[off : off + 12]))
    struct.pack_into("<I", buf, off + 12, crc)
    return o + tl + pl


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
