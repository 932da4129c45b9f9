# MQTT 3.1.1 wire format: encode client packets, decode and validate broker packets, plus
# the little of MQTT 5 that its hot paths share (a PUBLISH's properties, the frame check);
# the rest of 5 lives in mqtt.v5. Pure functions over bytes/memoryview; no I/O, no clock,
# no state, so it is tested exhaustively.
from micropython import const

CONNECT = const(0x10)
CONNACK = const(0x20)
PUBLISH = const(0x30)
PUBACK = const(0x40)
PUBREC = const(0x50)
PUBREL = const(0x60)
PUBCOMP = const(0x70)
SUBSCRIBE = const(0x80)
SUBACK = const(0x90)
UNSUBSCRIBE = const(0xA0)
UNSUBACK = const(0xB0)
PINGREQ = const(0xC0)
PINGRESP = const(0xD0)
DISCONNECT = const(0xE0)

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"

# The largest remaining length MQTT can express (MQTT-2.2.3): four 7-bit groups.
MAX_REMAINING = const(268435455)

# Fixed-header flag nibble the broker must use for each packet type it may send us
# (MQTT-2.2.2-2). PUBLISH flags carry DUP/QoS/RETAIN and are checked separately.
_SERVER_FLAGS = {
    CONNACK: 0,
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 2,
    PUBCOMP: 0,
    SUBACK: 0,
    UNSUBACK: 0,
    PINGRESP: 0,
}


class ProtocolError(ValueError):
    """The broker sent something that is not valid MQTT 3.1.1; the connection must close."""


def varlen_size(n):
    if n < 128:
        return 1
    if n < 16384:
        return 2
    if n < 2097152:
        return 3
    return 4


def write_varlen(buf, off, n):
    """Write n as a remaining-length varint at buf[off:]; return the offset after it."""
    if n < 0 or n > MAX_REMAINING:
        raise ValueError("remaining length out of range")
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            buf[off] = b | 0x80
            off += 1
        else:
            buf[off] = b
            return off + 1


class VarlenDecoder:
    """Incremental remaining-length decoder fed one byte at a time, so a reader never
    buffers more than the fixed header before it knows the frame is acceptable."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.value = 0
        self.shift = 0

    def feed(self, b):
        """Return the length once complete, None while more bytes are needed."""
        self.value |= (b & 0x7F) << self.shift
        if b & 0x80 == 0:
            return self.value
        self.shift += 7
        if self.shift >= 28:
            raise ProtocolError("remaining length longer than 4 bytes")
        return None


def check_fixed_header(byte0, length, max_frame, v5=False):
    """Validate a broker packet's first byte and length before its body is read. With
    v5, acknowledgements may carry a reason code and properties, and a server may send
    DISCONNECT."""
    ptype = byte0 & 0xF0
    flags = byte0 & 0x0F
    if ptype == PUBLISH:
        if (flags >> 1) & 3 == 3:
            raise ProtocolError("PUBLISH with QoS 3")
    else:
        want = 0 if v5 and ptype == DISCONNECT else _SERVER_FLAGS.get(ptype)
        if want is None:
            raise ProtocolError("packet type %d not sent by a server" % (ptype >> 4))
        if flags != want:
            raise ProtocolError("bad flags on packet type %d" % (ptype >> 4))
        if ptype in (CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK) and (
                length < 2 if v5 else length != 2):
            raise ProtocolError("packet type %d must have length 2" % (ptype >> 4))
        if ptype == PINGRESP and length != 0:
            raise ProtocolError("PINGRESP must have length 0")
        if ptype == SUBACK and length < 3:
            raise ProtocolError("SUBACK too short")
    if length > max_frame:
        raise ProtocolError("frame of %d bytes exceeds limit %d" % (length, max_frame))
    return ptype


def _put_str(buf, off, s):
    n = len(s)
    buf[off] = n >> 8
    buf[off + 1] = n & 0xFF
    buf[off + 2 : off + 2 + n] = s
    return off + 2 + n


def _b(s):
    return s.encode() if isinstance(s, str) else s


def connect_packet(client_id, keepalive, clean=False, will=None, user=None, password=None,
                   props=None, will_props=None):
    """CONNECT. will is (topic, payload, qos, retain) or None. Built once per connect.
    props (bytes, under 128): protocol level 5 with this CONNECT property section, and the
    will's will_props (mqtt.v5 builds both); None: 3.1.1."""
    client_id = _b(client_id)
    flags = 0x02 if clean else 0
    size = 10 + 2 + len(client_id)
    if props is not None:
        size += 1 + len(props)
    if will:
        wt, wm, wq, wr = _b(will[0]), _b(will[1]), will[2], will[3]
        flags |= 0x04 | (wq << 3) | (0x20 if wr else 0)
        size += 4 + len(wt) + len(wm)
        if props is not None:
            size += 1 + len(will_props)
    if user is not None:
        user = _b(user)
        flags |= 0x80
        size += 2 + len(user)
        if password is not None:
            password = _b(password)
            flags |= 0x40
            size += 2 + len(password)
    buf = bytearray(1 + varlen_size(size) + size)
    buf[0] = CONNECT
    off = write_varlen(buf, 1, size)
    off = _put_str(buf, off, b"MQTT")
    buf[off] = 4 if props is None else 5  # protocol level 3.1.1 or 5
    buf[off + 1] = flags
    buf[off + 2] = keepalive >> 8
    buf[off + 3] = keepalive & 0xFF
    off += 4
    if props is not None:
        off = _put_props(buf, off, props)
    off = _put_str(buf, off, client_id)
    if will:
        if props is not None:
            off = _put_props(buf, off, will_props)
        off = _put_str(buf, off, wt)
        off = _put_str(buf, off, wm)
    if user is not None:
        off = _put_str(buf, off, user)
        if password is not None:
            off = _put_str(buf, off, password)
    return buf


def _put_props(buf, off, props):
    """An MQTT 5 property section of under 128 bytes: its length, then it."""
    buf[off] = len(props)
    buf[off + 1:off + 1 + len(props)] = props
    return off + 1 + len(props)


def publish_size(topic, payload, qos, props=None):
    body = 2 + len(topic) + len(payload) + (2 if qos else 0) + (len(props) if props else 0)
    return 1 + varlen_size(body) + body


def publish_header_into(buf, topic, plen, qos=0, retain=False, dup=False, pid=0,
                        props=None):
    """Encode a PUBLISH's fixed header, topic, packet id and (MQTT 5) properties, length
    included: everything before a payload of plen bytes, into buf; return its length."""
    body = 2 + len(topic) + plen + (2 if qos else 0) + (len(props) if props else 0)
    buf[0] = PUBLISH | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    off = write_varlen(buf, 1, body)
    off = _put_str(buf, off, topic)
    if qos:
        buf[off] = pid >> 8
        buf[off + 1] = pid & 0xFF
        off += 2
    if props:
        buf[off:off + len(props)] = props
        off += len(props)
    return off


def publish_view(mv, topic, payload, qos=0, retain=False, dup=False, pid=0, props=None):
    """Encode a whole PUBLISH at the start of memoryview mv; return the view of its bytes
    (the only allocation), or None when it does not fit (mv untouched). props: MQTT 5's
    property section, length first (b"\x00" for none); None for 3.1.1."""
    tl = len(topic)
    pl = len(payload)
    body = tl + pl + (4 if qos else 2)
    if props:
        body += len(props)
    off = 2 if body < 128 else 1 + varlen_size(body)
    n = off + body
    if n > len(mv):
        return None
    # Stores go into the packet's own view: a slice store also moves every byte after
    # the slice to its end (MicroPython), here only the packet's, not the whole buffer's.
    pkt = mv[:n]
    pkt[0] = PUBLISH | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    if off == 2:
        pkt[1] = body
    else:
        write_varlen(pkt, 1, body)
    pkt[off] = tl >> 8
    pkt[off + 1] = tl & 0xFF
    off += 2
    pkt[n - pl :] = payload  # first: nothing after it to move
    pkt[off : off + tl] = topic
    if qos:
        pkt[off + tl] = pid >> 8
        pkt[off + tl + 1] = pid & 0xFF
        tl += 2
    if props:
        pkt[off + tl : n - pl] = props
    return pkt


def publish_into(buf, topic, payload, qos=0, retain=False, dup=False, pid=0, props=None):
    """Encode a whole PUBLISH into the preallocated buf; return its length.
    topic and payload are bytes-like; the caller sized buf with publish_size()."""
    off = publish_header_into(buf, topic, len(payload), qos, retain, dup, pid, props)
    n = len(payload)
    buf[off : off + n] = payload
    return off + n


def ack_into(buf, ptype, pid):
    """Two-byte-body acknowledgements (PUBACK) into a 4-byte buffer."""
    buf[0] = ptype
    buf[1] = 2
    buf[2] = pid >> 8
    buf[3] = pid & 0xFF
    return 4


def subscribe_packet(pid, topics):
    """SUBSCRIBE for [(topic, qos), ...]."""
    size = 2
    for t, _ in topics:
        size += 3 + len(_b(t))
    buf = bytearray(1 + varlen_size(size) + size)
    buf[0] = SUBSCRIBE | 0x02
    off = write_varlen(buf, 1, size)
    buf[off] = pid >> 8
    buf[off + 1] = pid & 0xFF
    off += 2
    for t, q in topics:
        off = _put_str(buf, off, _b(t))
        buf[off] = q
        off += 1
    return buf


def decode_pid(body):
    return (body[0] << 8) | body[1]


def decode_connack(body):
    """Return (session_present, return_code)."""
    if body[0] & 0xFE:
        raise ProtocolError("CONNACK reserved bits set")
    return bool(body[0] & 1), body[1]


def decode_publish(flags, body, v5=False):
    """Return (topic bytes, payload memoryview, qos, pid, dup, retain) of a PUBLISH body;
    with v5 its properties are skipped (we allow the server no topic aliases)."""
    n = len(body)
    if n < 2:
        raise ProtocolError("PUBLISH too short")
    tlen = (body[0] << 8) | body[1]
    qos = (flags >> 1) & 3
    end = 2 + tlen
    if end + (2 if qos else 0) > n:
        raise ProtocolError("PUBLISH topic runs past the frame")
    topic = bytes(body[2:end])
    pid = 0
    if qos:
        pid = (body[end] << 8) | body[end + 1]
        if pid == 0:
            raise ProtocolError("PUBLISH QoS>0 with packet id 0")
        end += 2
    if v5:
        if not tlen:
            raise ProtocolError("PUBLISH with an empty topic (no alias was allowed)")
        k = 0
        shift = 0
        while True:
            if end >= n:
                raise ProtocolError("PUBLISH properties run past the frame")
            c = body[end]
            end += 1
            k |= (c & 0x7F) << shift
            if c & 0x80 == 0:
                break
            shift += 7
            if shift >= 28:
                raise ProtocolError("variable integer longer than 4 bytes")
        end += k
        if end > n:
            raise ProtocolError("PUBLISH properties run past the frame")
    return topic, body[end:], qos, pid, bool(flags & 8), bool(flags & 1)


def decode_suback(body):
    """Return (pid, granted qos list); 0x80 means refused."""
    return decode_pid(body), [body[i] for i in range(2, len(body))]


CONNACK_REASONS = {
    0: "accepted",
    1: "bad protocol version",
    2: "client id rejected",
    3: "server unavailable",
    4: "bad username or password",
    5: "not authorised",
}
