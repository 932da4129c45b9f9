# MQTT 3.1.1 codec: exact bytes out, strict validation of what comes in.
import micropython

from mqtt import codec
from mpyutil import raises


def _varlen(n):
    buf = bytearray(4)
    end = codec.write_varlen(buf, 0, n)
    return bytes(buf[:end])


def test_varlen_boundaries_roundtrip():
    for n, size in ((0, 1), (127, 1), (128, 2), (16383, 2), (16384, 3), (2097151, 3),
                    (2097152, 4), (268435455, 4)):
        enc = _varlen(n)
        assert len(enc) == size == codec.varlen_size(n), (n, enc)
        d = codec.VarlenDecoder()
        got = None
        for b in enc:
            assert got is None
            got = d.feed(b)
        assert got == n


def test_varlen_spec_examples():
    assert _varlen(321) == b"\xc1\x02"
    assert _varlen(268435455) == b"\xff\xff\xff\x7f"


def test_varlen_out_of_range_and_five_bytes_rejected():
    raises(ValueError, _varlen, 268435456)
    d = codec.VarlenDecoder()
    for _ in range(3):
        assert d.feed(0xFF) is None
    raises(codec.ProtocolError, d.feed, 0xFF)


def test_connect_packet_bytes_with_will_and_credentials():
    pkt = codec.connect_packet("d1", 60, False, ("s", "x", 1, True), "u", "p")
    want = (b"\x10\x1a\x00\x04MQTT\x04" + bytes([0x80 | 0x40 | 0x20 | 0x08 | 0x04])
            + b"\x00\x3c\x00\x02d1\x00\x01s\x00\x01x\x00\x01u\x00\x01p")
    assert bytes(pkt) == want, pkt


def test_connect_clean_session_flag():
    assert codec.connect_packet("a", 10, True)[9] == 0x02
    assert codec.connect_packet("a", 10, False)[9] == 0x00


def test_publish_roundtrip_qos1_dup_retain():
    buf = bytearray(64)
    n = codec.publish_into(buf, b"a/b", b"hello", 1, True, True, 0x1234)
    assert n == codec.publish_size(b"a/b", b"hello", 1)
    assert buf[0] == 0x30 | 0x08 | 0x02 | 0x01
    codec.check_fixed_header(buf[0], n - 2, 4096)
    topic, payload, qos, pid, dup, retain = codec.decode_publish(buf[0] & 15, memoryview(buf)[2:n])
    assert (topic, bytes(payload), qos, pid, dup, retain) == (b"a/b", b"hello", 1, 0x1234, True, True)


def test_publish_qos0_has_no_packet_id():
    buf = bytearray(64)
    n = codec.publish_into(buf, b"t", b"p", 0)
    assert bytes(buf[:n]) == b"\x30\x04\x00\x01tp"


def test_publish_into_allocates_nothing():
    buf = bytearray(128)
    topic, payload = b"devices/x/telemetry", b"x" * 64
    codec.publish_into(buf, topic, payload, 1, False, False, 1)
    micropython.heap_lock()
    try:
        for pid in range(1, 50):
            codec.publish_into(buf, topic, payload, 1, False, False, pid)
    finally:
        micropython.heap_unlock()


def test_publish_view_matches_publish_into_and_writes_nothing_past_the_packet():
    mv = memoryview(bytearray(17000))
    for tl, pl in ((1, 0), (3, 5), (28, 64), (10, 113), (10, 114), (10, 115), (10, 116),
                   (1, 16380), (1, 16381), (1, 16400)):
        topic = b"t" * tl
        payload = bytes(range(256)) * (pl // 256) + bytes(range(pl % 256))
        for qos, retain, dup, pid in ((0, False, False, 0), (0, True, False, 0),
                                      (1, False, False, 1), (1, True, True, 0x1234)):
            want = bytearray(codec.publish_size(topic, payload, qos))
            codec.publish_into(want, topic, payload, qos, retain, dup, pid)
            mv[len(want)] = 0xEE
            pkt = codec.publish_view(mv, memoryview(topic), payload, qos, retain, dup, pid)
            assert bytes(pkt) == want, (tl, pl, qos)
            assert mv[len(want)] == 0xEE
    small = memoryview(bytearray(8))
    assert codec.publish_view(small, b"t", b"1234", 0) is None  # 9 bytes
    assert bytes(small) == bytes(8)
    assert bytes(codec.publish_view(small, b"t", b"123", 0)) == b"\x30\x06\x00\x01t123"


def test_fixed_header_rejects_bad_frames():
    raises(codec.ProtocolError, codec.check_fixed_header, 0x10, 10, 4096)  # CONNECT from a server
    raises(codec.ProtocolError, codec.check_fixed_header, 0x00, 0, 4096)  # reserved type 0
    raises(codec.ProtocolError, codec.check_fixed_header, 0xF0, 0, 4096)  # reserved type 15
    raises(codec.ProtocolError, codec.check_fixed_header, 0x21, 2, 4096)  # CONNACK flags
    raises(codec.ProtocolError, codec.check_fixed_header, 0x20, 3, 4096)  # CONNACK length
    raises(codec.ProtocolError, codec.check_fixed_header, 0x36, 10, 4096)  # PUBLISH QoS 3
    raises(codec.ProtocolError, codec.check_fixed_header, 0x30, 5000, 4096)  # oversize
    raises(codec.ProtocolError, codec.check_fixed_header, 0xD0, 1, 4096)  # PINGRESP body
    raises(codec.ProtocolError, codec.check_fixed_header, 0x90, 2, 4096)  # SUBACK, no codes
    assert codec.check_fixed_header(0x62, 2, 4096) == codec.PUBREL
    assert codec.check_fixed_header(0x40, 2, 4096) == codec.PUBACK


def test_decode_publish_rejects_truncation_and_pid_zero():
    raises(codec.ProtocolError, codec.decode_publish, 0, memoryview(b"\x00"))
    raises(codec.ProtocolError, codec.decode_publish, 0, memoryview(b"\x00\x05ab"))
    raises(codec.ProtocolError, codec.decode_publish, 2, memoryview(b"\x00\x01t\x00"))
    raises(codec.ProtocolError, codec.decode_publish, 2, memoryview(b"\x00\x01t\x00\x00"))


def test_connack_and_suback():
    assert codec.decode_connack(b"\x01\x00") == (True, 0)
    assert codec.decode_connack(b"\x00\x05") == (False, 5)
    raises(codec.ProtocolError, codec.decode_connack, b"\x02\x00")
    assert codec.decode_suback(b"\x00\x07\x01\x80") == (7, [1, 0x80])


def test_subscribe_packet_bytes():
    pkt = codec.subscribe_packet(10, [(b"a/b", 1), (b"c", 0)])
    assert bytes(pkt) == b"\x82\x0c\x00\x0a\x00\x03a/b\x01\x00\x01c\x00"
