# SNTP client: the codec against replies built here, then query and TimeSync.run against a
# fake server that is a non-blocking UDP socket in this process and event loop.
import asyncio
import errno
import os
import socket
import struct
import sys
import time

from backoff import Rng
from firmware.ntp import NotOurs, NtpError, TimeSync, parse, query, request, unix_from_ntp
from mpyutil import raises

S = 1751234567  # 2025-06-29: the fake server's transmit time, in Unix seconds
NTP_1970 = 2208988800
ERA = 1 << 32


def ntp_ts(unix_s, ms):
    """(seconds, fraction) as a server writes them; the fraction is the middle of the ms."""
    return (unix_s + NTP_1970) % ERA, (2 * ms + 1) * ERA // 2000


def reply(origin, unix_s=S, ms=250, stratum=2, li=0, vn=4, mode=4, kiss=b"GPS\0",
          recv=None, tx=None):
    """A server reply; recv is the receive timestamp as (unix_s, ms), None = transmit time."""
    b = bytearray(48)
    b[0] = li << 6 | vn << 3 | mode
    b[1] = stratum
    b[12:16] = kiss
    b[24:32] = origin
    rs, rf = ntp_ts(*(recv or (unix_s, ms)))
    ts, tf = tx if tx is not None else ntp_ts(unix_s, ms)
    struct.pack_into("!IIII", b, 32, rs, rf, ts, tf)
    return b


def new_request(seed=1):
    req = bytearray(48)
    request(req, Rng(seed))
    return req


# ---- codec -------------------------------------------------------------------------------


def test_request_layout():
    buf = bytearray(b"\xff" * 48)  # a reused buffer: everything but the timestamp cleared
    r = Rng(1)
    request(buf, r)
    assert buf[0] >> 6 == 0 and (buf[0] >> 3) & 7 == 4 and buf[0] & 7 == 3
    assert bytes(buf[1:40]) == bytes(39)
    tx1 = bytes(buf[40:48])
    assert tx1 != bytes(8)
    request(buf, r)
    tx2 = bytes(buf[40:48])
    assert tx2 != tx1  # a fresh value per request: an old reply cannot answer a new one
    assert bytes(new_request(2)[40:48]) != bytes(new_request(3)[40:48])


def test_parse_well_formed_reply():
    req = new_request()
    assert parse(reply(req[40:48]), 48, req) == (S, 250)
    assert parse(reply(req[40:48], ms=0), 48, req) == (S, 0)
    assert parse(reply(req[40:48], ms=999), 48, req) == (S, 999)
    assert parse(reply(req[40:48], vn=3, stratum=15), 48, req) == (S, 250)  # NTPv3 server
    assert parse(reply(req[40:48], li=1, stratum=1), 48, req) == (S, 250)  # leap warning
    long = reply(req[40:48]) + bytearray(20)  # extension fields are ignored
    assert parse(long, len(long), req) == (S, 250)


def test_fraction_decodes_to_the_millisecond():
    req = new_request()
    for ms in range(1000):
        assert parse(reply(req[40:48], ms=ms), 48, req) == (S, ms), ms


def test_parse_adds_the_one_way_delay():
    req = new_request()
    o = req[40:48]
    # 100 ms round trip, server held the request 20 ms: 80 ms on the wire, half of it back
    assert parse(reply(o, ms=250, recv=(S, 230)), 48, req, 100) == (S, 290)
    assert parse(reply(o, ms=980), 48, req, 100) == (S + 1, 30)  # carries into the second
    # a receive timestamp that is missing or longer than the round trip earns no credit
    assert parse(reply(o, ms=250, recv=(S - 5, 0)), 48, req, 100) == (S, 300)
    b = reply(o, ms=250)
    b[32:40] = bytes(8)
    assert parse(b, 48, req, 100) == (S, 300)
    assert parse(reply(o, ms=250, recv=(S, 260)), 48, req, 100) == (S, 300)


def test_era_1_after_2036():
    req = new_request()
    o = req[40:48]
    era1 = 2085978496  # 2036-02-07 06:28:16 UTC, NTP seconds wrap to 0
    assert unix_from_ntp(0) == era1
    assert unix_from_ntp(0xFFFFFFFF) == era1 - 1
    assert unix_from_ntp(S + NTP_1970) == S
    y2040 = 2208988800  # 2040-01-01: top bit clear in the NTP seconds
    secs, _ = ntp_ts(y2040, 0)
    assert secs < 0x80000000
    assert parse(reply(o, unix_s=y2040, ms=500), 48, req) == (y2040, 500)
    assert parse(reply(o, unix_s=era1, ms=1), 48, req) == (era1, 1)  # seconds field is 0
    assert parse(reply(o, unix_s=era1 - 1, ms=999), 48, req) == (era1 - 1, 999)
    # after the crossing, a server still holding its request from before it
    assert parse(reply(o, unix_s=era1, ms=5, recv=(era1 - 1, 995)), 48, req, 30) == (era1, 15)
    # the pivot is late 2023: a time that would be earlier is read as the next era
    y2150 = 1600000000 + ERA
    assert parse(reply(o, unix_s=y2150, ms=0), 48, req) == (y2150, 0)


def test_rejections():
    req = new_request()
    o = req[40:48]
    for e, text in (
        (raises(NotOurs, parse, reply(o), 47, req), "short"),
        (raises(NotOurs, parse, reply(o, mode=3), 48, req), "mode 3"),  # our request echoed
        (raises(NotOurs, parse, reply(o, mode=5), 48, req), "mode 5"),  # broadcast
        (raises(NotOurs, parse, reply(o[:7] + bytes([o[7] ^ 1])), 48, req), "originate"),
        (raises(NotOurs, parse, reply(bytes(8)), 48, req), "originate"),
        # a spoofed kiss-o'-death must not make us give up on a server
        (raises(NotOurs, parse, reply(bytes(8), stratum=0, kiss=b"DENY"), 48, req),
         "originate"),
    ):
        assert isinstance(e, NtpError) and isinstance(e, ValueError)
        assert text in str(e), (text, str(e))
    for e, text in (
        (raises(NtpError, parse, reply(o, stratum=0, kiss=b"RATE"), 48, req),
         "kiss-o'-death RATE"),
        (raises(NtpError, parse, reply(o, stratum=16), 48, req), "stratum 16"),
        (raises(NtpError, parse, reply(o, stratum=255), 48, req), "stratum 255"),
        (raises(NtpError, parse, reply(o, li=3), 48, req), "unsynchronised"),
        (raises(NtpError, parse, reply(o, tx=(0, 0)), 48, req), "zero transmit"),
    ):
        assert isinstance(e, ValueError) and not isinstance(e, NotOurs), str(e)
        assert text in str(e), (text, str(e))


def test_module_stays_off_the_hardware():
    assert "machine" not in sys.modules and "network" not in sys.modules


# ---- fake server ---------------------------------------------------------------------------


def free_port():
    # The Unix port's sockets have no getsockname, so a port bound as 0 cannot be learnt:
    # pick a random high one and take the next if it is in use.
    b = os.urandom(2)
    return 20000 + ((b[0] << 8 | b[1]) % 40000)


class FakeServer:
    """Answers each request by the next of `modes` (the last one repeats): ok, silent,
    wrong_origin, kod, spoof_then_ok (a reply with a wrong originate first)."""

    def __init__(self, modes, host="127.0.0.1", port=None, unix_s=S, ms=250):
        self.modes = modes
        self.unix_s = unix_s
        self.ms = ms
        self.requests = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        for _ in range(20):
            p = port or free_port()
            try:
                self.sock.bind(socket.getaddrinfo(host, p)[0][-1])
                break
            except OSError as e:
                if port or e.args[0] != errno.EADDRINUSE:
                    self.sock.close()
                    raise
        self.port = p
        self.addr = socket.getaddrinfo(host, p)[0][-1]
        self.task = asyncio.create_task(self.serve())

    async def serve(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(128)
            except OSError:
                await asyncio.sleep_ms(2)
                continue
            self.requests.append(bytes(data))
            n = len(self.requests)
            mode = self.modes[min(n, len(self.modes)) - 1]
            origin = data[40:48]
            if mode == "ok":
                self.sock.sendto(reply(origin, self.unix_s, self.ms), peer)
            elif mode == "wrong_origin":
                self.sock.sendto(reply(bytes(8), self.unix_s, self.ms), peer)
            elif mode == "spoof_then_ok":
                self.sock.sendto(reply(b"12345678", self.unix_s + 1000, self.ms), peer)
                self.sock.sendto(reply(origin, self.unix_s, self.ms), peer)
            elif mode == "kod":
                self.sock.sendto(reply(origin, stratum=0, kiss=b"RATE"), peer)

    def close(self):
        self.task.cancel()
        self.sock.close()


def servers_on_two_addresses(modes_a, modes_b):
    """Two servers on one port (TimeSync asks every server on the same port)."""
    for _ in range(20):
        a = FakeServer(modes_a, "127.0.0.1")
        try:
            return a, FakeServer(modes_b, "127.0.0.2", a.port)
        except OSError:
            a.close()
    raise AssertionError("no common free port")


async def araises(exc, coro):
    try:
        await coro
    except exc as e:
        return e
    raise AssertionError("%s not raised" % exc.__name__)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# ---- query ---------------------------------------------------------------------------------


async def test_query_returns_the_servers_time():
    srv = FakeServer(["ok"])
    try:
        fds = open_fds()
        secs, ms, rtt = await query(srv.addr, 1000, Rng(3))
        assert secs == S and 250 <= ms <= 250 + rtt // 2 + 1, (secs, ms, rtt)
        assert 0 <= rtt < 200
        assert len(srv.requests) == 1
        r = srv.requests[0]
        assert len(r) == 48 and r[0] == 0x23 and r[40:48] != bytes(8)
        assert open_fds() == fds  # the socket was closed
    finally:
        srv.close()


async def test_query_ignores_a_spoofed_reply_and_takes_the_real_one():
    srv = FakeServer(["spoof_then_ok"])
    try:
        secs, ms, _ = await query(srv.addr, 1000, Rng(4))
        assert secs == S, secs  # not S + 1000 from the spoofed datagram
    finally:
        srv.close()


async def test_query_times_out_when_every_reply_has_a_wrong_originate():
    srv = FakeServer(["wrong_origin"])
    try:
        fds = open_fds()
        t = time.ticks_ms()
        e = await araises(asyncio.TimeoutError, query(srv.addr, 300, Rng(5)))
        took = time.ticks_diff(time.ticks_ms(), t)
        assert 300 <= took < 600, took
        assert "originate" in str(e), str(e)
        assert len(srv.requests) == 1
        assert open_fds() == fds
    finally:
        srv.close()


async def test_query_times_out_when_the_server_is_silent():
    srv = FakeServer(["silent"])
    try:
        t = time.ticks_ms()
        await araises(asyncio.TimeoutError, query(srv.addr, 300, Rng(6)))
        assert 300 <= time.ticks_diff(time.ticks_ms(), t) < 600
        assert len(srv.requests) == 1
    finally:
        srv.close()


async def test_query_fails_at_once_on_a_kiss_of_death():
    srv = FakeServer(["kod"])
    try:
        t = time.ticks_ms()
        e = await araises(NtpError, query(srv.addr, 2000, Rng(7)))
        assert "RATE" in str(e)
        assert time.ticks_diff(time.ticks_ms(), t) < 500  # the server said no: no waiting
    finally:
        srv.close()


async def test_query_fails_fast_on_a_closed_port():
    srv = FakeServer(["silent"])
    addr = srv.addr
    srv.close()
    t = time.ticks_ms()
    e = await araises(OSError, query(addr, 2000, Rng(8)))
    assert e.args[0] == errno.ECONNREFUSED, e
    assert time.ticks_diff(time.ticks_ms(), t) < 500


async def test_cancelled_query_closes_its_socket():
    srv = FakeServer(["silent"])
    try:
        fds = open_fds()
        task = asyncio.create_task(query(srv.addr, 5000, Rng(9)))
        await asyncio.sleep_ms(50)
        assert open_fds() == fds + 1
        task.cancel()
        await asyncio.sleep_ms(10)
        assert open_fds() == fds
    finally:
        srv.close()


# ---- TimeSync -------------------------------------------------------------------------------


class Rec:
    """What a TimeSync hands to the outside: clock settings, log lines, beats."""

    def __init__(self, fail_sets=0):
        self.sets = []
        self.logs = []
        self.beats = []  # (ticks, within_ms)
        self.fail_sets = fail_sets

    def set_time(self, secs, ms):
        if self.fail_sets:
            self.fail_sets -= 1
            raise OSError(5)
        self.sets.append((secs, ms))

    def log(self, level, msg):
        self.logs.append((level, msg))

    def beat(self, within_ms):
        self.beats.append((time.ticks_ms(), within_ms))


def time_sync(rec, servers, port, **kw):
    kw.setdefault("timeout_ms", 300)
    return TimeSync(rec.set_time, Rng(11), rec.log, time.ticks_ms, servers, port=port,
                    beat=rec.beat, **kw)


async def wait_for(cond, ms):
    for _ in range(ms // 10):
        if cond():
            return
        await asyncio.sleep_ms(10)
    raise AssertionError("condition not met in %d ms" % ms)


async def test_timesync_sets_the_clock_at_boot_and_resyncs_on_a_jittered_interval():
    srv = FakeServer(["ok"])
    rec = Rec()
    ts = time_sync(rec, ["127.0.0.1"], srv.port, interval_s=0.2, now=lambda: S - 5)
    assert not ts.synced
    task = asyncio.create_task(ts.run())
    try:
        await asyncio.sleep_ms(60)
        assert len(rec.sets) == 1  # at once at boot, no wait first
        assert rec.sets[0][0] == S and 250 <= rec.sets[0][1] < 300, rec.sets
        assert ts.synced
        assert 5250 <= ts.stats["last_offset_ms"] < 5300, ts.stats
        await asyncio.sleep_ms(700)
        # waits of 0.1..0.3 s: in 0.7 s at least two more and no more than seven
        assert 3 <= len(rec.sets) <= 8, rec.sets
        assert all(s == S for s, _ in rec.sets)
        st = ts.stats
        assert st["syncs"] == len(rec.sets) and st["failures"] == 0 and st["last_error"] is None
        assert st["resolves"] == 1 and st["server"] == "127.0.0.1"
        assert len(srv.requests) == len(rec.sets)
        # the origin check needs a new transmit timestamp per request
        assert len(set(r[40:48] for r in srv.requests)) == len(srv.requests)
        assert rec.logs[0] == ("D", "ntp: resolved 127.0.0.1")
        assert rec.logs[1][0] == "I" and "moved 5" in rec.logs[1][1], rec.logs
    finally:
        task.cancel()
        srv.close()
    # every beat came within what the one before it announced
    for (t0, within), (t1, _) in zip(rec.beats, rec.beats[1:]):
        assert time.ticks_diff(t1, t0) <= within, rec.beats
    waits = [w for _, w in rec.beats[1::2]]  # before each sleep: wait + timeout + slack
    assert all(100 + 300 <= w for w in waits), waits


async def test_first_server_failing_falls_through_to_the_next():
    a, b = servers_on_two_addresses(["kod"], ["ok"])
    rec = Rec()
    ts = time_sync(rec, ["nonexistent.invalid", "127.0.0.1", "127.0.0.2"], a.port)
    try:
        assert await ts.sync()
        assert rec.sets and rec.sets[0][0] == S
        assert len(a.requests) == 1 and len(b.requests) == 1
        st = ts.stats
        assert st["failures"] == 2 and st["syncs"] == 1, st
        assert st["last_error"] == "kiss-o'-death RATE" and st["server"] == "127.0.0.2"
        assert st["last_offset_ms"] is None  # no `now` given
        warns = [m for lv, m in rec.logs if lv == "W"]
        assert len(warns) == 2 and warns[0].startswith("ntp nonexistent.invalid: os error")
        # a silent first server costs its timeout, then the second answers
        a.modes = ["silent"]
        t = time.ticks_ms()
        assert await ts.sync()
        took = time.ticks_diff(time.ticks_ms(), t)
        assert 300 <= took < 700, took
        assert st["last_error"] == "timeout" and st["failures"] == 4 and st["syncs"] == 2
        # the answering server's address stayed cached; the failing ones are asked again
        assert st["resolves"] == 3, st
    finally:
        a.close()
        b.close()


async def test_failures_are_counted_and_retried_with_backoff():
    srv = FakeServer(["kod", "kod", "wrong_origin", "ok"])
    rec = Rec()
    ts = time_sync(rec, ["127.0.0.1"], srv.port, timeout_ms=200, base_s=0.05, cap_s=0.1)
    task = asyncio.create_task(ts.run())
    try:
        await wait_for(lambda: rec.sets, 3000)
        st = ts.stats
        assert rec.sets[0][0] == S
        assert st["failures"] == 3 and st["syncs"] == 1 and ts.synced, st
        assert st["last_error"] == "timeout (originate mismatch)", st
        assert st["resolves"] == 4  # asked again after each failure
        assert len(srv.requests) == 4
        retries = [m for lv, m in rec.logs if m.startswith("ntp: clock not set")]
        assert len(retries) == 3, rec.logs
    finally:
        task.cancel()
        srv.close()


async def test_a_failing_set_time_is_counted_and_does_not_end_the_task():
    srv = FakeServer(["ok"])
    rec = Rec(fail_sets=1)
    ts = time_sync(rec, ["127.0.0.1"], srv.port, base_s=0.05, cap_s=0.1)
    task = asyncio.create_task(ts.run())
    try:
        await wait_for(lambda: rec.sets, 2000)
        st = ts.stats
        assert st["failures"] == 1 and st["syncs"] == 1 and ts.synced, st
        assert st["last_error"] == "set_time: os error 5", st
        assert st["resolves"] == 1  # the server was fine: its address stays cached
    finally:
        task.cancel()
        srv.close()


async def test_a_long_interval_is_slept_in_steps_with_a_beat_before_each():
    srv = FakeServer(["ok"])
    rec = Rec()
    ts = time_sync(rec, ["127.0.0.1"], srv.port, interval_s=0.4)
    ts.max_sleep_ms = 50  # stands for the hour-long steps of a week-long interval
    task = asyncio.create_task(ts.run())
    try:
        await wait_for(lambda: len(rec.sets) >= 2, 2000)
    finally:
        task.cancel()
        srv.close()
    ws = [w for _, w in rec.beats]
    query_beat = ws[0]  # before asking a server: its timeout plus slack
    assert query_beat >= 300
    end = ws.index(query_beat, 1)
    steps = [w - query_beat for w in ws[1:end]]
    assert len(steps) >= 4, ws  # 0.2..0.6 s in steps of at most 50 ms
    assert all(0 < st <= 50 for st in steps), ws
    for (t0, within), (t1, _) in zip(rec.beats, rec.beats[1:]):
        assert time.ticks_diff(t1, t0) <= within, rec.beats
