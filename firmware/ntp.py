# SNTP (RFC 4330) client that keeps a board's clock set: telemetry timestamps and TLS
# certificate dates need wall time, and an MCU's RTC starts at its epoch after every power
# cut. A pure codec, one bounded async query, and the TimeSync task that retries and resyncs.
import asyncio
import socket
import struct
import time

from micropython import const

from backoff import full_jitter, jittered

_LEN = const(48)
_REQ0 = const(0x23)  # LI 0, VN 4, mode 3 (client)
_MODE_SERVER = const(4)
_NTP_1970 = const(2208988800)  # seconds from 1900 (NTP era 0) to 1970
_ERA = const(4294967296)  # seconds per NTP era: the 32-bit seconds field wraps in Feb 2036
# Earliest time a server can mean. A timestamp that would fall before it is in the next
# era, so replies decode right from late 2023 until 2159 (not just the 1968..2104 window of
# the RFC's top-bit rule).
_PIVOT = const(1700000000)
# Covers what happens between two beats besides the announced waits: a blocking DNS
# lookup, set_time and scheduling delays.
_SLACK_MS = const(5000)


class NtpError(ValueError):
    """A reply that cannot be used."""


class NotOurs(NtpError):
    """A datagram that is not the answer to our request (too short, not from a server,
    originate timestamp not ours): while waiting it is ignored, as a spoofed one would be."""


def request(buf, rnd):
    """Fill buf[0:48] with a client request. The transmit timestamp is random: the server
    echoes it as the originate timestamp, so an off-path sender cannot forge an answer,
    and it does not tell anyone what our clock says."""
    buf[0] = _REQ0
    for i in range(1, 40):
        buf[i] = 0
    struct.pack_into("!II", buf, 40, rnd.u32() or 1, rnd.u32())


def unix_from_ntp(secs):
    """NTP seconds (32 bits, any era) -> Unix seconds at or after _PIVOT."""
    u = secs - _NTP_1970
    if u < _PIVOT:
        u += _ERA
    return u


def parse(reply, n, req, rtt_ms=0):
    """Check the n-byte reply against our request `req`; returns (unix_s, ms), both int:
    the server's transmit time plus the one-way delay (half the round trip `rtt_ms`
    measured locally, less the time the server held the request).

    Ints, not a float: a single-precision float (ESP32, RP2) resolves 1.7e9 only to 128 s.
    """
    if n < _LEN:
        raise NotOurs("short reply (%d bytes)" % n)
    mode = reply[0] & 7
    if mode != _MODE_SERVER:
        raise NotOurs("mode %d, not a server reply" % mode)
    for i in range(8):
        if reply[24 + i] != req[40 + i]:
            raise NotOurs("originate mismatch")
    # From here the reply answers our request: what it says is the server's answer.
    stratum = reply[1]
    if stratum == 0:
        code = "".join(chr(c) if 32 < c < 127 else "?" for c in reply[12:16])
        raise NtpError("kiss-o'-death " + code)
    if stratum > 15:
        raise NtpError("stratum %d" % stratum)
    if reply[0] >> 6 == 3:
        raise NtpError("server unsynchronised")
    rs, rf, ts, tf = struct.unpack_from("!IIII", reply, 32)
    if ts == 0 and tf == 0:
        raise NtpError("zero transmit timestamp")
    secs = unix_from_ntp(ts)
    ms = ((tf >> 16) * 1000) >> 16  # in two steps: stays a small int on 32-bit ports
    # A server that left its receive timestamp out (or sends nonsense) gets no credit for
    # its hold time: the whole round trip then counts as network delay.
    held = (secs - unix_from_ntp(rs)) * 1000 + ms - (((rf >> 16) * 1000) >> 16)
    delay = rtt_ms - held if 0 <= held <= rtt_ms else rtt_ms
    ms += delay >> 1
    return secs + ms // 1000, ms % 1000


async def query(addr, timeout_ms, rnd, ticks_ms=time.ticks_ms, ticks_diff=time.ticks_diff,
                req=None, rx=None,
                poll_ms=10):
    """One exchange with the server at sockaddr `addr`, within timeout_ms; returns
    (unix_s, ms, rtt_ms). Raises NtpError for a refusal (kiss-o'-death, unsynchronised),
    asyncio.TimeoutError when no usable reply came, OSError from the socket (e.g. ICMP
    port unreachable). req and rx are 48-byte buffers, reused by a caller that asks often."""
    if req is None:
        req = bytearray(_LEN)
    if rx is None:
        rx = bytearray(_LEN)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        # Connected: the stack drops datagrams from any other address and reports an
        # unreachable port, so a dead server fails at once rather than at the timeout.
        s.connect(addr)
        request(req, rnd)
        t0 = ticks_ms()
        s.send(req)
        ignored = None
        while True:
            # MicroPython's asyncio cannot wait for a UDP socket to become readable, so
            # poll; readinto returns None (no exception, no allocation) when nothing came.
            n = s.readinto(rx)
            waited = ticks_diff(ticks_ms(), t0)
            if n is not None:
                try:
                    secs, ms = parse(rx, n, req, waited)
                    return secs, ms, waited
                except NotOurs as e:
                    ignored = e
            if waited >= timeout_ms:
                raise asyncio.TimeoutError() if ignored is None else asyncio.TimeoutError(
                    str(ignored))
            # After a stray datagram only yield: the answer may be queued right behind it.
            await asyncio.sleep_ms(0 if n is not None else min(poll_ms, timeout_ms - waited))
    finally:
        s.close()


def _reason(e):
    if isinstance(e, asyncio.TimeoutError):
        return "timeout" if not e.args else "timeout (%s)" % e.args[0]
    if isinstance(e, NtpError):
        return str(e)
    if isinstance(e, OSError):
        return "os error %s" % e.args[0]
    return "%s %s" % (type(e).__name__, e)


class TimeSync:
    """The task that sets the clock at boot and keeps it set.

    set_time(unix_s, ms): called with int seconds since 1970 and milliseconds.
    now(): current Unix time (None while unset); only for stats["last_offset_ms"].
    beat(within_ms): called before every wait with how long until the next call.
    """

    max_sleep_ms = 3600000  # longest single sleep between beats

    def __init__(self, set_time, rnd, log, ticks_ms, servers, port=123, interval_s=3600,
                 timeout_ms=3000, beat=None, now=None, base_s=2, cap_s=300, poll_ms=10,
                 ticks_diff=time.ticks_diff):
        self.set_time = set_time
        self.rnd = rnd
        self.log = log
        self.ticks_ms = ticks_ms
        self.ticks_diff = ticks_diff
        self.servers = servers
        self.port = port
        self.interval_s = interval_s
        self.timeout_ms = timeout_ms
        self.beat = beat
        self.now = now
        self.base_s = base_s
        self.cap_s = cap_s
        self.poll_ms = poll_ms
        self.synced = False
        self.stats = {"syncs": 0, "failures": 0, "resolves": 0, "last_error": None,
                      "last_offset_ms": None, "last_rtt_ms": None, "server": None}
        # getaddrinfo blocks the whole loop on MicroPython: each server's answer is kept
        # until a query to that server fails.
        self._addrs: list = [None] * len(servers)
        self._req = bytearray(_LEN)
        self._rx = bytearray(_LEN)

    def _beat(self, within_ms):
        if self.beat is not None:
            self.beat(within_ms)

    async def sync(self):
        """One round: the servers in order until one answers. True if the clock was set."""
        for i in range(len(self.servers)):
            host = self.servers[i]
            self._beat(self.timeout_ms + _SLACK_MS)
            try:
                addr = self._addrs[i]
                if addr is None:
                    addr = socket.getaddrinfo(host, self.port, socket.AF_INET,
                                              socket.SOCK_DGRAM)[0][-1]
                    self._addrs[i] = addr
                    self.stats["resolves"] += 1
                    self.log("D", "ntp: resolved %s" % host)
                secs, ms, rtt = await query(addr, self.timeout_ms, self.rnd, self.ticks_ms,
                                            self.ticks_diff, self._req, self._rx, self.poll_ms)
            except Exception as e:  # whatever went wrong, the next server may still answer
                self._addrs[i] = None  # the address may have moved: ask DNS again next time
                self._failed(host, _reason(e))
                continue
            return self._set(host, secs, ms, rtt)
        return False

    def _failed(self, host, reason):
        self.stats["failures"] += 1
        self.stats["last_error"] = reason
        self.log("W", "ntp %s: %s" % (host, reason))

    def _set(self, host, secs, ms, rtt):
        before = self.now() if self.now is not None else None
        try:
            self.set_time(secs, ms)
        except Exception as e:  # a board fault must not end the task (and the device's gather)
            self._failed(host, "set_time: %s" % _reason(e))
            return False
        moved = None if before is None else round((secs - before) * 1000) + ms
        st = self.stats
        st["syncs"] += 1
        st["last_offset_ms"] = moved
        st["last_rtt_ms"] = rtt
        st["server"] = host
        # The first setting and a real correction are news; routine resyncs are not.
        level = "I" if not self.synced or moved is None or abs(moved) > 1000 else "D"
        self.synced = True
        self.log(level, "ntp: clock set from %s, moved %s ms, rtt %d ms" % (host, moved, rtt))
        return True

    async def run(self):
        failed = 0
        while True:
            if await self.sync():
                failed = 0
                wait = jittered(self.interval_s, self.rnd)
            else:
                wait = full_jitter(failed, self.base_s, self.cap_s, self.rnd)
                failed += 1
                self.log("W", "ntp: clock not set; retry in %.1f s" % wait)
            left = int(wait * 1000)
            while left > 0:
                # In steps: a 32-bit port's ticks cannot express a wait beyond 2**29 ms
                # (6.2 days; the interval may be a week, jittered up to 1.5x).
                step = left if left < self.max_sleep_ms else self.max_sleep_ms
                self._beat(step + self.timeout_ms + _SLACK_MS)
                await asyncio.sleep_ms(step)
                left -= step
