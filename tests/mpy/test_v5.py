# MQTT 5 codec: exact CONNECT bytes, the properties of what a broker sends, reason names,
# and a PUBLISH's properties on the shared fast path.
from mqtt import codec, v5
from mpyutil import raises


def test_connect_v5_bytes_with_expiry_max_packet_will_delay_and_credentials():
    pkt = v5.connect_packet("d1", 60, False, ("s", "x", 1, True), "u", "p",
                            session_expiry=604800, max_packet=4101, will_delay=30)
    props = b"\x0a\x11\x00\x09\x3a\x80\x27\x00\x00\x10\x05"
    wprops = b"\x05\x18\x00\x00\x00\x1e"
    body = (b"\x00\x04MQTT\x05" + bytes([0x80 | 0x40 | 0x20 | 0x08 | 0x04]) + b"\x00\x3c"
            + props + b"\x00\x02d1" + wprops + b"\x00\x01s\x00\x01x\x00\x01u\x00\x01p")
    assert bytes(pkt) == b"\x10" + bytes([len(body)]) + body, pkt


def test_connect_v5_without_properties_has_an_empty_section():
    pkt = v5.connect_packet("a", 10, True)
    assert bytes(pkt) == b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x0a\x00\x00\x01a", pkt
    pkt = v5.connect_packet("a", 10, False, ("w", "", 0, False))
    assert bytes(pkt)[-9:] == b"\x00\x01a\x00\x00\x01w\x00\x00"


def test_connack_v5_properties_and_the_31_refusal():
    body = (b"\x01\x00" + b"\x10" + b"\x21\x00\x02" + b"\x27\x00\x00\x01\x00"
            + b"\x22\x00\x0a" + b"\x13\x00\x1e" + b"\x24\x01")
    present, rc, props = v5.decode_connack(memoryview(body))
    assert present and rc == 0
    assert props == {0x21: 2, 0x27: 256, 0x22: 10, 0x13: 30, 0x24: 1}, props
    # A 3.1.1 broker refuses protocol level 5 with its own two-byte CONNACK.
    assert v5.decode_connack(b"\x00\x01") == (False, 1, {})
    body = b"\x00\x9c\x0f\x1c\x00\x0cbroker2:1884"
    assert v5.decode_connack(body)[2] == {0x1C: b"broker2:1884"}
    raises(codec.ProtocolError, v5.decode_connack, b"\x00\x00\x05\x21\x00")  # past its section
    raises(codec.ProtocolError, v5.decode_connack, b"\x00\x00\x02\x7f\x00")  # unknown property
    raises(codec.ProtocolError, v5.decode_connack, b"\x02\x00\x00")  # reserved flag


def test_user_properties_and_strings_are_read_past():
    body = b"\x00\x00" + b"\x0d" + b"\x26\x00\x01k\x00\x02vv" + b"\x1f\x00\x02hi"
    assert v5.decode_connack(body)[2] == {0x1F: b"hi"}


def test_puback_suback_disconnect_v5():
    assert v5.decode_ack(b"\x00\x07") == (7, 0, None)
    assert v5.decode_ack(b"\x00\x07\x97") == (7, 0x97, None)
    assert v5.decode_ack(b"\x00\x07\x87\x05\x1f\x00\x02no") == (7, 0x87, {0x1F: b"no"})
    assert v5.decode_suback(b"\x00\x05\x00\x01\x87") == (5, [1, 0x87])
    assert v5.decode_suback(b"\x00\x05\x04\x1f\x00\x01x\x00") == (5, [0])
    assert v5.decode_disconnect(b"") == (0, {})
    assert v5.decode_disconnect(b"\x89") == (0x89, {})
    assert v5.decode_disconnect(b"\x9d\x06\x1c\x00\x03h:1") == (0x9D, {0x1C: b"h:1"})


def test_reason_names():
    assert v5.reason(0x89) == "server busy"
    assert v5.reason(0x9F) == "connection rate exceeded"
    assert v5.reason(0x97) == "quota exceeded"
    assert v5.reason(0x5A) == "0x5a"


def test_fixed_header_v5_allows_reason_codes_and_a_server_disconnect():
    codec.check_fixed_header(0x40, 3, 100, True)
    codec.check_fixed_header(0x20, 9, 100, True)
    codec.check_fixed_header(0xE0, 0, 100, True)
    raises(codec.ProtocolError, codec.check_fixed_header, 0x40, 3, 100)  # 3.1.1: exactly 2
    raises(codec.ProtocolError, codec.check_fixed_header, 0xE0, 0, 100)  # not in 3.1.1
    raises(codec.ProtocolError, codec.check_fixed_header, 0x40, 1, 100, True)
    raises(codec.ProtocolError, codec.check_fixed_header, 0xE2, 0, 100, True)


def test_publish_with_properties_and_alias():
    mv = memoryview(bytearray(64))
    alias = v5.alias_props(1)
    pkt = codec.publish_view(mv, b"t/x", b"hi", 1, False, False, 9, alias)
    assert bytes(pkt) == b"\x32\x0d\x00\x03t/x\x00\x09\x03\x23\x00\x01hi", bytes(pkt)
    want = bytearray(codec.publish_size(b"t/x", b"hi", 1, alias))
    codec.publish_into(want, b"t/x", b"hi", 1, False, False, 9, alias)
    assert bytes(pkt) == want
    # An established alias: empty topic.
    pkt = codec.publish_view(mv, b"", b"hi", 0, False, False, 0, alias)
    assert bytes(pkt) == b"\x30\x08\x00\x00\x03\x23\x00\x01hi", bytes(pkt)
    pkt = codec.publish_view(mv, b"a", b"", 0, False, False, 0, b"\x00")
    assert bytes(pkt) == b"\x30\x04\x00\x01a\x00", bytes(pkt)


def test_decode_publish_v5_skips_properties():
    body = b"\x00\x01a\x00\x05\x05\x02\x00\x00\x00\x3cpayload"
    topic, payload, qos, pid, dup, retain = codec.decode_publish(2, memoryview(body), True)
    assert (topic, bytes(payload), qos, pid) == (b"a", b"payload", 1, 5)
    topic, payload, _, _, _, _ = codec.decode_publish(0, b"\x00\x01a\x00xy", True)
    assert bytes(payload) == b"xy"
    raises(codec.ProtocolError, codec.decode_publish, 0, b"\x00\x01a\x09xy", True)  # past the frame
    raises(codec.ProtocolError, codec.decode_publish, 0, b"\x00\x00\x00xy", True)  # an alias


def test_subscribe_v5_bytes():
    pkt = v5.subscribe_packet(3, [(b"a/b", 1), ("c", 0)])
    assert bytes(pkt) == b"\x82\x0d\x00\x03\x00\x00\x03a/b\x01\x00\x01c\x00", bytes(pkt)


def test_server_reference_only_to_a_listed_endpoint():
    eps = [{"host": "b1.example", "port": 1883}, {"host": "B2.example", "port": 8883}]
    assert v5.server_reference(b"b2.example:8883", eps) == 1
    assert v5.server_reference(b"b2.example", eps) == 1
    assert v5.server_reference(b"evil.example:1883 b1.example:1883", eps) == 0
    assert v5.server_reference(b"b2.example:1883", eps) is None
    assert v5.server_reference(b"evil.example", eps) is None
    assert v5.server_reference(None, eps) is None
