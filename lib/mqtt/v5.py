# MQTT 5 wire format beyond 3.1.1's: CONNECT with properties, the properties of CONNACK,
# PUBACK, SUBACK and a server's DISCONNECT, and reason codes by name. Pure, like codec;
# imported only when a connection speaks 5, so a 3.1.1 device never loads it.
from micropython import const

from mqtt.codec import ProtocolError, _b, _put_str, varlen_size, write_varlen
from mqtt.codec import connect_packet as _connect

SESSION_EXPIRY = const(0x11)
RECEIVE_MAX = const(0x21)
MAX_PACKET = const(0x27)
TOPIC_ALIAS_MAX = const(0x22)
TOPIC_ALIAS = const(0x23)
SERVER_KEEPALIVE = const(0x13)
SERVER_REFERENCE = const(0x1C)
REASON_STRING = const(0x1F)
ASSIGNED_ID = const(0x12)
WILL_DELAY = const(0x18)
MESSAGE_EXPIRY = const(0x02)
USER_PROPERTY = const(0x26)

# Size of each property's value, by property id (0x00..0x2A): 1, 2, 4 bytes; 0 a variable
# byte integer; 5 a string or binary (2-byte length); 6 a string pair; 255 no such property
# (a protocol error). Bytes rather than a dict: nothing to build in the heap at import.
_SIZES = b'\xff\x01\x04\x05\xff\xff\xff\xff\x05\x05\xff\x00\xff\xff\xff\xff\xff\x04\x05\x02\xff\x05\x05\x01\x04\x01\x05\xff\x05\xff\xff\x05\xff\x02\x02\x02\x01\x01\x06\x04\x01\x01\x01'

# The error reasons' names, each after its code (0x80 and up; the names are ASCII, so a
# byte of 0x80 or more starts the next): one constant in the bytecode, no dict in the heap.
_NAMES = (
    b"\x80unspecified error"
    b"\x81malformed packet"
    b"\x82protocol error"
    b"\x83implementation specific error"
    b"\x84unsupported protocol version"
    b"\x85client identifier not valid"
    b"\x86bad user name or password"
    b"\x87not authorized"
    b"\x88server unavailable"
    b"\x89server busy"
    b"\x8abanned"
    b"\x8bserver shutting down"
    b"\x8cbad authentication method"
    b"\x8dkeep alive timeout"
    b"\x8esession taken over"
    b"\x8ftopic filter invalid"
    b"\x90topic name invalid"
    b"\x91packet identifier in use"
    b"\x93receive maximum exceeded"
    b"\x94topic alias invalid"
    b"\x95packet too large"
    b"\x96message rate too high"
    b"\x97quota exceeded"
    b"\x98administrative action"
    b"\x99payload format invalid"
    b"\x9aretain not supported"
    b"\x9bqos not supported"
    b"\x9cuse another server"
    b"\x9dserver moved"
    b"\x9eshared subscriptions not supported"
    b"\x9fconnection rate exceeded"
    b"\xa0maximum connect time"
    b"\xa1subscription identifiers not supported"
    b"\xa2wildcard subscriptions not supported"
)
_OK = {0x00: "success", 0x04: "disconnect with will message", 0x10: "no matching subscribers"}


def reason(rc):
    """A reason code's name (an unknown one as its hex value)."""
    if rc < 0x80:
        return _OK.get(rc) or "0x%02x" % rc
    i = _NAMES.find(bytes((rc,)))
    if i < 0:
        return "0x%02x" % rc
    j = i + 1
    while j < len(_NAMES) and _NAMES[j] < 0x80:
        j += 1
    return _NAMES[i + 1:j].decode()


def read_varint(b, off):
    """A variable byte integer at b[off:]: (value, offset after it)."""
    v = 0
    shift = 0
    while True:
        if off >= len(b):
            raise ProtocolError("variable integer runs past the frame")
        c = b[off]
        off += 1
        v |= (c & 0x7F) << shift
        if c & 0x80 == 0:
            return v, off
        shift += 7
        if shift >= 28:
            raise ProtocolError("variable integer longer than 4 bytes")


def read_props(b, off):
    """Properties at b[off:] (length first): ({id: value}, offset after them). Strings are
    bytes; a repeated property keeps its last value (user properties are skipped)."""
    n, off = read_varint(b, off)
    end = off + n
    if end > len(b):
        raise ProtocolError("properties run past the frame")
    props = {}
    while off < end:
        pid = b[off]
        off += 1
        size = _SIZES[pid] if pid < len(_SIZES) else 255
        if size == 255:
            raise ProtocolError("unknown property 0x%02x" % pid)
        if size == 0:
            v, off = read_varint(b, off)
        elif size < 5:
            if off + size > end:
                raise ProtocolError("property runs past its section")
            v = 0
            for i in range(size):
                v = (v << 8) | b[off + i]
            off += size
        else:
            v = None
            for _ in range(size - 4):  # a pair is two strings
                if off + 2 > end:
                    raise ProtocolError("property runs past its section")
                k = (b[off] << 8) | b[off + 1]
                if off + 2 + k > end:
                    raise ProtocolError("property runs past its section")
                v = bytes(b[off + 2:off + 2 + k])
                off += 2 + k
            if pid == USER_PROPERTY:
                continue
        props[pid] = v
    return props, end


def _u32(v):
    return bytes((v >> 24 & 0xFF, v >> 16 & 0xFF, v >> 8 & 0xFF, v & 0xFF))


def connect_packet(client_id, keepalive, clean=False, will=None, user=None, password=None,
                   session_expiry=0, max_packet=0, will_delay=0):
    """CONNECT for protocol level 5: Session Expiry Interval and Maximum Packet Size in its
    properties (0: left out), Will Delay Interval in the will's. Built once per connect."""
    props = b""
    if session_expiry:
        props += b"\x11" + _u32(session_expiry)
    if max_packet:
        props += b"\x27" + _u32(max_packet)
    wprops = (b"\x18" + _u32(will_delay)) if will and will_delay else b""
    return _connect(client_id, keepalive, clean, will, user, password, props, wprops)


def decode_connack(body):
    """(session_present, reason code, properties). A 3.1.1 broker's two-byte CONNACK
    (its refusal of protocol level 5) has no properties."""
    if body[0] & 0xFE:
        raise ProtocolError("CONNACK reserved bits set")
    props = {}
    if len(body) > 2:
        props, end = read_props(body, 2)
        if end != len(body):
            raise ProtocolError("CONNACK longer than its properties")
    return bool(body[0] & 1), body[1], props


def decode_ack(body):
    """PUBACK/UNSUBACK-style body: (packet id, reason code, properties)."""
    pid = (body[0] << 8) | body[1]
    if len(body) == 2:
        return pid, 0, None
    rc = body[2]
    props = None
    if len(body) > 3:
        props = read_props(body, 3)[0]
    return pid, rc, props


def decode_suback(body):
    """(packet id, [reason code per filter]): 0..2 granted QoS, 0x80 and up refused."""
    _, off = read_props(body, 2)
    return (body[0] << 8) | body[1], [body[i] for i in range(off, len(body))]


def decode_disconnect(body):
    """A server's DISCONNECT: (reason code, properties)."""
    if not len(body):
        return 0, {}
    if len(body) == 1:
        return body[0], {}
    return body[0], read_props(body, 1)[0]


def alias_props(alias):
    """A PUBLISH's properties carrying Topic Alias `alias` (length included)."""
    return bytes((3, TOPIC_ALIAS, alias >> 8, alias & 0xFF))


def subscribe_packet(pid, topics):
    """SUBSCRIBE with no properties; each filter's options byte is its QoS (retained
    messages sent at subscribe, as 3.1.1 does)."""
    size = 3
    for t, _ in topics:
        size += 3 + len(_b(t))
    buf = bytearray(1 + varlen_size(size) + size)
    buf[0] = 0x82
    off = write_varlen(buf, 1, size)
    buf[off] = pid >> 8
    buf[off + 1] = pid & 0xFF
    buf[off + 2] = 0
    off += 3
    for t, q in topics:
        off = _put_str(buf, off, _b(t))
        buf[off] = q
        off += 1
    return buf


def server_reference(ref, endpoints):
    """Index of the endpoint a Server Reference names ("host[:port]", several separated
    by spaces), or None: a broker may send a device only to a broker it already knows."""
    if not ref:
        return None
    for item in bytes(ref).decode().split():
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            host, port = item, ""
        host = host.strip("[]").lower()
        for i, e in enumerate(endpoints):
            if e["host"].lower() == host and (not port or int(port) == e["port"]):
                return i
    return None
