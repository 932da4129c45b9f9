# Session state: packet ids, the in-flight window, resume order, inbound dedup.
from mqtt.session import Message, Session
from mpyutil import raises


def _msg(i):
    return Message(b"t", b"%d" % i, 1, False, i)


def test_packet_ids_start_at_one_and_wrap_past_65535():
    s = Session(window=4)
    assert s.next_pid() == 1
    s._next = 65534
    assert [s.next_pid(), s.next_pid(), s.next_pid()] == [65535, 1, 2]


def test_packet_ids_skip_ids_in_flight():
    s = Session(window=4)
    a = s.add(_msg(1))
    s._next = 65535
    b = s.add(_msg(2))
    assert (a, b) == (1, 2)


def test_window_bounds_in_flight():
    s = Session(window=2)
    s.add(_msg(1))
    s.add(_msg(2))
    assert s.full()
    raises(RuntimeError, s.add, _msg(3))
    assert s.ack(1).token == 1
    assert not s.full()
    assert s.ack(1) is None  # a second PUBACK for the same id is ignored


def test_a_message_that_must_not_wait_goes_beyond_the_window():
    # An inbound handler's answer, published from the read loop (lib/mqtt/client.py).
    s = Session(window=2)
    s.add(_msg(1))
    s.add(_msg(2))
    assert s.add(_msg(3), over=True) == 3 and len(s) == 3 and s.full()
    assert [m.token for m in s.pending()] == [1, 2, 3]
    s.ack(1)
    assert s.full()  # still two in flight: the window is back, not exceeded again


def test_pending_keeps_handover_order_across_wrap():
    s = Session(window=8)
    s._next = 65533
    for i in range(5):
        s.add(_msg(i))
    assert [m.token for m in s.pending()] == [0, 1, 2, 3, 4]
    assert [m.pid for m in s.pending()] == [65534, 65535, 1, 2, 3]


def test_renumber_gives_fresh_ids_in_order_and_clears_sent():
    s = Session(window=8)
    for i in range(3):
        s.add(_msg(i))
    for m in s.pending():
        m.sent = True
    s.ack(2)
    msgs = s.renumber()
    assert [m.token for m in msgs] == [0, 2]
    assert [m.pid for m in msgs] == [4, 5]
    assert not any(m.sent for m in msgs)
    assert s.ack(4).token == 0


def test_inbound_redelivery_detected_only_with_dup():
    s = Session(dedup=4)
    assert not s.seen_inbound(7, False)
    assert s.seen_inbound(7, True)
    assert not s.seen_inbound(7, False)  # id reused for a new message
    assert not s.seen_inbound(8, True)  # DUP but never seen: first delivery to us


def test_inbound_dedup_memory_is_bounded():
    s = Session(dedup=4)
    for pid in range(1, 6):
        s.seen_inbound(pid, False)
    assert len(s._seen) == 4
    assert not s.seen_inbound(1, True)  # forgotten: oldest overwritten
    assert s.seen_inbound(5, True)
