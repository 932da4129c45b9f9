# Async MQTT client (5 where the broker speaks it, else 3.1.1): one connection task that
# connects, resumes the session, reads, keeps the link alive and reconnects with jittered
# backoff. Wire format lives in codec (and v5, loaded with the first 5 connection),
# in-flight state in session; this module only does the asyncio I/O around them.
import asyncio
import gc
import select
import socket
import sys
import time
from errno import EINPROGRESS

from mqtt import codec
from mqtt.session import Message, Session
from backoff import Backoff, Rng


_MAX_ADDRS = 4  # addresses of one name tried per attempt
_MAX_ALIASES = 8  # topics declared for Topic Alias (5): bounded memory
_CORK_MAX = 1400  # a gathered flight is written once it holds a TCP segment's worth


class MQTTError(Exception):
    pass


class Refused(MQTTError):
    """CONNACK with a non-zero return code (or reason code, with 5)."""

    def __init__(self, rc, v5=False, to=None):
        self.rc = rc
        self.reason = reason_name(rc, v5)
        self.to = to  # a redirect's endpoint index, when it names one of ours
        super().__init__("CONNACK refused: " + self.reason)


def reason_name(rc, v5):
    if v5:
        from mqtt.v5 import reason

        return reason(rc)
    return codec.CONNACK_REASONS.get(rc) or str(rc)


class _Downgrade(Exception):
    """A broker that does not speak 5: try 3.1.1 at once."""


def _b(s):
    return s.encode() if isinstance(s, str) else s


def _log(level, msg):
    print(level, msg)


class MQTTClient:
    """Connection-owning MQTT client.

    Subscriptions are declared with `subscribe()` before or while `run()` goes; they are sent
    only when the broker has no session for us (CONNACK session-present = 0).
    QoS 1 publishes pipeline through an in-flight window of `window` messages.
    """

    def __init__(
        self,
        client_id,
        host,
        port=1883,
        keepalive=60,
        clean=False,
        will=None,
        user=None,
        password=None,
        ssl=None,
        tls_room=0,
        server_hostname=None,
        window=16,
        max_frame=4096,
        buf_size=1024,
        timeout=10,
        backoff=None,
        ticks_ms=time.ticks_ms,
        ticks_diff=time.ticks_diff,
        uptime_s=None,
        log=_log,
        on_message=None,
        on_connect=None,
        on_ack=None,
        link=None,
        beat=None,
        endpoints=None,
        failover=None,
        resolve=None,
        protocol="auto",
        session_expiry=0,
        will_delay=0,
        on_protocol=None,
    ):
        self.client_id = client_id
        self.keepalive = keepalive
        self.clean = clean
        # Every packet on the wire at once (TCP_NODELAY), for a caller whose time awake is
        # what counts (a duty-cycled wake): with Nagle, the PUBLISHes after the first of a
        # flight wait for its ACK, a round trip more per wake.
        self.nodelay = False
        self._cork = None  # the resume's flight, gathered into one write (with nodelay)
        self.will = will
        # "auto" (5, then 3.1.1 for a broker that does not speak it), "5" or "3.1.1"; an
        # endpoint's own "protocol" wins. An endpoint found to speak only 3.1.1 is marked
        # "fallback": True and on_protocol(index, True) told, to be remembered on flash.
        self.protocol = protocol
        self.session_expiry = session_expiry  # seconds a 5 broker keeps our session
        self.will_delay = will_delay  # seconds a 5 broker waits before the last will
        self.on_protocol = on_protocol
        self.v5 = False  # what the current (or last) connection speaks
        self._v5 = None  # the v5 module, once a connection spoke 5
        self._ka = keepalive  # in effect: a 5 broker's Server Keep Alive replaces ours
        self._window = window  # ours; a 5 broker's Receive Maximum may lower it
        self._max_out = 0  # a 5 broker's Maximum Packet Size (0: none)
        self._rm = 65535  # a 5 broker's Receive Maximum
        # Topic aliases (5): topics declared with alias(), numbered from 1; per connection,
        # which are established and the broker's maximum.
        self._alias_of = {}
        self._alias_props = []
        self._alias_on = bytearray(0)
        self._alias_max = 0
        self.last_reason = None  # name of the last refusal or server disconnect
        self.had_session = False  # an earlier boot connected: the broker may keep a session
        self._downgrading = False  # a 3.1.1 attempt after 5 was not understood
        self._disc = None  # a server DISCONNECT's (reason code, endpoint it names or None)
        # Brokers in priority order, each {host, port, user, password, ssl,
        # server_hostname}; the arguments of the same names make a single one.
        self.endpoints = endpoints or [
            {"host": host, "port": port, "user": user, "password": password, "ssl": ssl,
             "server_hostname": server_hostname}]
        # Which endpoint to use and when to move (firmware/failover.py): .failed() after each
        # failed attempt -> index to move to or None, .connected(), .link_waited().
        self.failover = failover
        # fn(host, port) -> getaddrinfo entries; a board may answer for the host's resolver.
        self.resolve = resolve or _resolve
        self.ep = 0
        self._use(0)
        self._next_ep = None  # a planned move (fail-back), made at the next connect
        self._last_ep = None  # endpoint of the last connection
        self._lost_at = None  # uptime when the last connection ended
        self._moved = 0  # how the endpoint last changed: 1 failover, 2 fail-back
        # Where mbedTLS allocates from the GC heap (RP2, the 32-bit board model), its 16 KiB
        # receive record must find one free block at every connect: after the first
        # connection, the outage's small allocations land in the hole it left, and the
        # next handshake fails with ENOMEM in a heap with plenty free. So a block of
        # `tls_room` bytes holds that hole while disconnected and is let go just before
        # the handshake.
        self.tls_room = tls_room if any(e.get("ssl") for e in self.endpoints) else 0
        self._room = None
        self.max_frame = max_frame
        self.timeout = timeout
        self.backoff = backoff or Backoff(Rng(time.ticks_ms()))
        self.ticks_ms = ticks_ms
        self.ticks_diff = ticks_diff
        # fn() -> seconds that never wrap (the board's uptime): how long a connection lasted
        # can be weeks, past what ticks_diff spans on a board (6.2 days).
        self.uptime_s = uptime_s or time.time
        self.log = log
        self.on_message = on_message  # async or plain fn(topic: bytes, payload: memoryview, retain)
        self.on_connect = on_connect  # fn(session_present) after subscribe/resend on each connect
        self.on_ack = on_ack  # fn(Message) when a QoS 1 message is acknowledged
        # An asyncio.Event set while the network link is up: no attempt is made without it.
        self.link = link
        # fn(ms or None): "alive, next check-in within ms" for a watchdog supervisor; None
        # while idle on purpose (waiting for the link).
        self.beat = beat or _no_beat
        self.session = Session(window)
        self.subs = []  # [(topic, qos)]
        self.connected = asyncio.Event()
        self.stats = {
            "connects": 0,
            "connect_failures": 0,
            "tls_failures": 0,
            "tls_room_misses": 0,
            "resolves": 0,
            "refusals": 0,
            "flaps": 0,
            "protocol_errors": 0,
            "handler_errors": 0,
            "big_frames": 0,
            "keepalive_timeouts": 0,
            "resends": 0,
            "pings": 0,
            "sub_refusals": 0,  # topic filters a SUBACK refused (0x80): an ACL, usually
            "oversized": 0,  # inbound PUBLISHes over max_frame, acknowledged and dropped
            "rx": 0,
            "tx": 0,
            "last_refusal": None,  # its reason, by name
            "failovers": 0,
            "failbacks": 0,
            "redirects": 0,
            "server_disconnects": 0,
            "puback_errors": 0,  # PUBACKs with an error reason (5): the message is kept
            "too_big": 0,  # messages over the broker's Maximum Packet Size, never sent
            "downgrades": 0,  # endpoints found to speak 3.1.1 only
        }
        self._hold_room()
        for i in range(len(self.endpoints)):
            if self.protocol_of(i) == "5":
                # Now, while the heap is young (and compiling it, from source, finds room),
                # rather than at the first connect; not at all when every broker is known
                # to speak 3.1.1 only.
                from mqtt import v5

                self._v5 = v5
                break
        # What went wrong since the last successful connect; handed to the app (and reset)
        # when the next one succeeds, so refusals are reported once there is a link.
        self.outage = None
        # failed attempts, refusals, last refusal code, flaps, protocol errors
        self._trouble = [0, 0, None, 0, 0]
        self._addrs = None  # cached getaddrinfo entries: DNS is asked again only after failures
        self._sock = None
        self._step = ""
        self._writer = None
        self._reader = None
        # Write gate of the current connection: [lock, writers holding or waiting for it].
        # A new one per connection, so a writer stuck on a dead socket cannot hold up
        # the next connection's writes.
        self._gate = [asyncio.Lock(), 0]
        self._pinging = False
        self._rtask = None  # the read loop's task: inbound handlers run on it
        self._space = asyncio.Event()
        self._suback = asyncio.Event()
        self._sub_pid = 0
        self._subs_sent = []
        self._dead = asyncio.Event()
        self._stop = False
        self._epoch = 0  # connections made so far; Message.sent refers to it
        self._last_rx = 0
        self._last_tx = 0
        # Preallocated for the common case; a larger message (up to max_frame) is written
        # as header, then payload, and a larger inbound frame gets a buffer of its own.
        self._txbuf = bytearray(buf_size)
        self._txmv = memoryview(self._txbuf)
        self._ackbuf = bytearray(4)
        # Inbound bytes are read in chunks into one buffer and parsed in place: a burst of
        # PUBACKs costs one read, not three per packet.
        self._rxbuf = bytearray(buf_size)
        self._rxmv = memoryview(self._rxbuf)
        self._r0 = 0  # start of unparsed bytes
        self._r1 = 0  # end of bytes read
        self._vl = codec.VarlenDecoder()

    # ---- app API -------------------------------------------------------------------

    def subscribe(self, topic, qos=1):
        """Declare a subscription; it is sent whenever the broker has no session for us."""
        self.subs.append((_b(topic), qos))

    def alias(self, topic):
        """Declare a topic published often (telemetry): with 5, and as many as the broker
        allows, it goes out as a two-byte Topic Alias after its first message on each
        connection."""
        topic = _b(topic)
        if topic not in self._alias_of and len(self._alias_props) < _MAX_ALIASES:
            n = len(self._alias_props) + 1
            self._alias_of[topic] = n
            self._alias_props.append(bytes((3, 0x23, n >> 8, n & 0xFF)))
            self._alias_on = bytearray(n)

    def protocol_of(self, i):
        """What endpoint i is tried with first: "5" or "3.1.1"."""
        e = self.endpoints[i]
        p = e.get("protocol") or self.protocol
        if p == "auto":
            return "3.1.1" if e.get("fallback") else "5"
        return p

    def retry_v5(self):
        """Forget which endpoints spoke only 3.1.1 (a broker may have been upgraded): the
        next connect to each tries 5 first. Called on the device's own random schedule
        (the config refresh), so a fleet never retries at once."""
        for i, e in enumerate(self.endpoints):
            if e.get("fallback"):
                e["fallback"] = False
                if self.on_protocol:
                    self.on_protocol(i, False)

    def is_connected(self):
        return self.connected.is_set()

    def link_lost(self):
        """The network link went (Wi-Fi status): drop the connection now rather than a
        keepalive later; run() waits for the link before the next attempt."""
        if self._sock is not None:
            self.log("W", "network link lost: closing the connection")
            self._kill()

    def endpoint_name(self, i=None):
        e = self.endpoints[self.ep if i is None else i]
        return "%s:%d" % (e["host"], e["port"])

    def _use(self, i):
        e = self.endpoints[i]
        self.ep = i
        self.host = e["host"]
        self.port = e["port"]
        self.user = e.get("user")
        self.password = e.get("password")
        self.ssl = e.get("ssl")
        self.server_hostname = e.get("server_hostname") or e["host"]
        self._addrs = None

    async def move_to(self, i, final=None):
        """A planned move to endpoint i (fail-back): an optional final (topic, payload,
        retain) QoS 1 publish and DISCONNECT on the current broker (no last will there),
        then run() connects to endpoint i at once. Not connected: the next attempt goes
        there."""
        self._next_ep = i
        if not self.connected.is_set():
            return
        try:
            await self._leave(final)
            # Not _kill() now: run() may already be on the next connection, and _dead
            # would end that one.
            return
        except (OSError, asyncio.TimeoutError) as e:
            self.log("W", "leaving %s: %r" % (self.endpoint_name(), e))
        self._kill()

    async def publish(self, topic, payload, qos=0, retain=False, wait=True, token=None,
                      urgent=False):
        """Publish. QoS 0 goes out only while connected (returns False otherwise).
        QoS 1 waits for room in the in-flight window, is kept until its PUBACK and survives
        reconnects; with wait=True this returns once acknowledged, else once handed over
        (on_ack tells later). Returns the packet id for QoS 1."""
        # Inline, not _b(): a Python call costs more than the test on an MCU.
        if isinstance(topic, str):
            topic = topic.encode()
        if isinstance(payload, str):
            payload = payload.encode()
        # publish_size() only near the limit: a header adds at most 9 bytes.
        n = len(topic) + len(payload) + 9
        if n > self.max_frame and codec.publish_size(topic, payload, qos) > self.max_frame:
            raise ValueError("message larger than max_frame")
        if self._max_out and n + 4 > self._max_out and self._too_big(topic, payload, qos):
            raise ValueError("message larger than the broker's maximum packet size")
        if qos == 0:
            if not self.connected.is_set():
                return False
            # _send_publish inlined: calling it costs 11k instructions of 82k per message
            # on the Cortex-M0 build (measured).
            props = None
            if self.v5:
                # Properties inline, as in _send_publish.
                props = b"\x00"
                i = self._alias_of.get(topic)
                if i is not None and i <= self._alias_max:
                    props = self._alias_props[i - 1]
                    if self._alias_on[i - 1]:
                        topic = b""
                    else:
                        self._alias_on[i - 1] = 1
            pkt = codec.publish_view(self._txmv, topic, payload, 0, retain, False, 0, props)
            if pkt is None:
                await self._send_big(topic, payload, 0, retain, False, 0, props)
            else:
                await self._write(pkt)
            return True
        over = False
        while self.session.full():
            if urgent and self._unacked(self._epoch) < self._rm:
                # About now (health): beyond our own window, never beyond the broker's.
                over = True
                break
            if asyncio.current_task() is self._rtask:
                # From an inbound handler (a command's answer, a config report): it runs on
                # the read loop, and room comes only with PUBACKs that this very task must
                # read, so waiting would wedge the connection. It goes beyond the window.
                over = True
                break
            self._space.clear()
            await self._space.wait()
        msg = Message(topic, payload, 1, retain, token)
        done = None
        if wait:
            done = msg.done = asyncio.Event()
        self.session.add(msg, over)
        if self.connected.is_set():
            # Marked before the write: its PUBACK may be read while the write yields.
            msg.sent = self._epoch
            try:
                await self._send_publish(topic, payload, 1, retain, False, msg.pid)
            except OSError:
                self._kill()  # stays in flight; the next connection resends it
        if done:
            await done.wait()
        return msg.pid

    async def room(self):
        """Wait until a QoS 1 publish would not wait for the in-flight window. A producer
        that takes its message from a queue calls this first, then publishes with no await
        in between, so the message is in the session before anything else runs."""
        while self.session.full():
            self._space.clear()
            await self._space.wait()

    async def disconnect(self, final=None, reader_alive=True, linger=None):
        """Graceful stop: an optional final (topic, payload, retain) QoS 1 publish, then
        DISCONNECT so the broker discards the last will. TCP keeps the two in order, so
        this does not wait for the PUBACK. It does wait (bounded) for the broker to close:
        closing with unread bytes makes the kernel send RST, which can destroy the
        DISCONNECT before the broker reads it and fire the will after all.
        reader_alive=False when the loop that ran the read task is gone (after Ctrl-C).
        linger: the longest wait for that close in s (None: timeout; 0: none)."""
        self._stop = True
        if self.connected.is_set():
            try:
                await self._leave(final, reader_alive, linger)
                self.log("I", "disconnected")
            except (OSError, asyncio.TimeoutError) as e:
                self.log("W", "graceful disconnect incomplete: %r" % (e,))
        self._kill()
        await self._close()

    async def _leave(self, final, reader_alive=True, linger=None):
        """The final publish, DISCONNECT and the wait for the broker to close (disconnect()
        says why)."""
        if final:
            msg = Message(_b(final[0]), _b(final[1]), 1, final[2])
            # Beyond our own window if need be (a broker slow to acknowledge must not cost
            # the final status), never beyond the broker's Receive Maximum.
            if len(self.session) < self._rm:
                self.session.add(msg, True)
                await self._send_msg(msg, False)
        await self._send(codec.DISCONNECT_PACKET)
        t = self.timeout if linger is None else linger
        if not t:
            return
        if reader_alive:
            await asyncio.wait_for(self._dead.wait(), t)
        else:
            await asyncio.wait_for(self._discard_until_eof(), t)

    async def abort(self):
        """Drop the connection without DISCONNECT, as a crash would: the broker publishes
        the last will. run() ends."""
        self._stop = True
        self._kill()
        await self._close()

    async def _discard_until_eof(self):
        buf = self._rxmv
        self._r0 = self._r1 = 0
        while await self._reader.readinto(buf):
            pass

    # ---- connection task -------------------------------------------------------------

    async def run(self):
        """Connect and stay connected until disconnect(); never raises for network faults."""
        bo = self.backoff
        # Every step of a connect is bounded by timeout (DNS, TCP, TLS, CONNACK).
        connect_ms = int(self.timeout * 4000) + 1000
        fo = self.failover
        while not self._stop:
            if self.link is not None and not self.link.is_set():
                self.beat(None)
                await self.link.wait()
                if fo:
                    fo.link_waited()  # no network is no verdict on the broker
            if self._next_ep is not None:
                self._use(self._next_ep)
                self._next_ep = None
                self._moved = 2
                self.stats["failbacks"] += 1
            if self._lost_at is None:
                self._lost_at = self.uptime_s()
            self.beat(connect_ms)
            try:
                present = await self._connect()
            except asyncio.CancelledError:
                await self._close()
                raise
            except Exception as e:  # every failure mode of a connect ends in a backoff
                await self._close()
                self._failed(e)
                # A failed handshake is a verification or configuration fault, not weather.
                lvl = "E" if self._step == "tls" else "W"
                i = fo.failed() if fo else None
                to = getattr(e, "to", None)
                if to is not None and to != self.ep:
                    # A broker's "use another server" naming one of ours: spread like a
                    # failover (the broker may send the whole fleet at once).
                    was = self.endpoint_name()
                    self._redirect(to)
                    d = bo.first_delay()
                    self.log("W", "%s: %s sends us to %s; connecting in %.1f s" % (
                        e.reason, was, self.endpoint_name(), d))
                elif i is not None and i != self.ep and self._next_ep is None:
                    was = self.endpoint_name()
                    self._use(i)
                    self._moved = 1
                    self.stats["failovers"] += 1
                    # Spread like the first reconnect after a drop: the whole fleet moves
                    # in the same minute, and the next broker must not get it in one second.
                    d = bo.first_delay()
                    self.log("E", "connect to %s failed at %s: %r; failing over to %s in "
                                  "%.1f s" % (was, self._step, e, self.endpoint_name(), d))
                else:
                    d = bo.next_delay(self.uptime_s() - self._lost_at)
                    self.log(lvl, "connect failed at %s: %r; retry in %.1f s"
                             % (self._step, e, d))
                self.beat(int(d * 1000))
                await asyncio.sleep(d)
                continue
            up = self.uptime_s()
            tasks = (
                asyncio.create_task(self._read_loop()),
                asyncio.create_task(self._keepalive_loop()),
            )
            self._rtask = tasks[0]
            # While connected the keepalive loop checks in; without keepalive nobody does.
            self.beat(int(self._ka * 1500) + connect_ms if self._ka else None)
            try:
                await self._resume(present)
                await self._dead.wait()
            except asyncio.CancelledError:
                self._stop = True
                for t in tasks:
                    t.cancel()
                await self._close()
                raise
            except Exception as e:
                self.log("W", "session setup failed: %r" % (e,))
            # Not in a `finally`: a Ctrl-C that lands in this task (on_connect runs here)
            # must leave the connection open for the graceful stop (final status,
            # DISCONNECT); closing it on the way out lost both.
            for t in tasks:
                t.cancel()
            await self._close()
            self._lost_at = self.uptime_s()
            if self._stop:
                break
            lasted = self._lost_at - up
            if self._next_ep is not None:
                continue  # a planned move: no backoff, the moment was chosen at random
            if lasted < bo.flap_s:
                self.stats["flaps"] += 1
                self._trouble[3] += 1
            d = bo.dropped(lasted)
            disc = self._disc
            self._disc = None
            if disc:
                # The broker said why it closed (5): busy reasons back off as an overload;
                # a redirect to one of our brokers is followed, spread like a failover.
                rc, to = disc
                if to is not None and to != self.ep:
                    self._redirect(to)
                else:
                    bo.refused(rc)
                    if bo.floor or bo.hard:
                        n = bo.next_delay(0)
                        d = n if n > d else d
            self.log("I", "link lost after %.1f s; reconnect in %.1f s" % (lasted, d))
            self.beat(int(d * 1000))
            await asyncio.sleep(d)

    def _failed(self, e):
        t = self._trouble
        t[0] += 1
        if isinstance(e, Refused):
            self.stats["refusals"] += 1
            self.stats["last_refusal"] = self.last_reason = e.reason
            t[1] += 1
            t[2] = e.reason
            if e.to is None:
                self.backoff.refused(e.rc)
            return
        self.stats["connect_failures"] += 1
        if isinstance(e, codec.ProtocolError):
            self.stats["protocol_errors"] += 1
            t[4] += 1
        if self._step == "tls":
            self.stats["tls_failures"] += 1
        # The broker may have moved (DNS change, failover): look it up again next time,
        # unless it is an address already (nothing to look up).
        if not _is_ip(self.host):
            self._addrs = None

    async def _connect(self):
        self._step = "dns"
        if self._addrs is None:
            # Blocking on MicroPython (no async resolver): done once and cached, so an
            # outage costs one lookup, not one per attempt.
            self._addrs = self.resolve(self.host, self.port)[:_MAX_ADDRS]
            if not self._addrs:
                raise OSError("no address for " + self.host)
            self.stats["resolves"] += 1
            self.log("I", "resolved %s: %d address(es)" % (self.host, len(self._addrs)))
        addrs = self._addrs
        n = len(addrs)
        if n > 1:
            self.beat(n * (int(self.timeout * 4000) + 1000))
        # A name with several addresses (a cluster behind DNS): each is tried in turn
        # before the attempt counts as failed; the one that answered goes first next time.
        for k in range(n):
            try:
                present = await self._connect_proto(addrs[k])
            except Refused:
                raise  # the broker answered: another address of it will not say otherwise
            except Exception as e:
                if k == n - 1:
                    raise
                self.log("W", "%s address %d of %d failed at %s: %r" % (
                    self.host, k + 1, n, self._step, e))
                await self._close()
                continue
            if k:
                addrs.insert(0, addrs.pop(k))
            return present

    async def _connect_proto(self, ai):
        """_connect_to, and for a broker that did not understand 5, 3.1.1 at once: the
        same attempt, so the fallback adds no backoff and no wave."""
        try:
            return await self._connect_to(ai)
        except _Downgrade:
            await self._close()
        try:
            return await self._connect_to(ai)
        except BaseException:
            if self._downgrading:  # 3.1.1 failed too: 5 was not the problem
                self._downgrading = False
                self.endpoints[self.ep]["fallback"] = False
            raise

    async def _connect_to(self, ai):
        self._dead.clear()
        self._r0 = self._r1 = 0
        self._step = "tcp"
        s = self._sock = socket.socket(ai[0], ai[1], ai[2])
        if self.nodelay:
            _no_delay(s)
        await _tcp_connect(s, ai, self.timeout)
        if self.ssl:
            self._step = "tls"
            self._free_room()
            s = self.ssl.wrap_socket(
                s, server_hostname=self.server_hostname, do_handshake_on_connect=False
            )
            s.setblocking(False)
            self._sock = s
        self._reader = self._writer = asyncio.StreamWriter(s, {})
        self._gate = [asyncio.Lock(), 0]
        self._pinging = False
        if not self.ssl:
            self._step = "connect"
        v5 = self.v5 = self.protocol_of(self.ep) == "5"
        if v5:
            m = self._v5
            if m is None:
                from mqtt import v5 as m

                self._v5 = m
            # The largest packet we take: a whole frame of max_frame bytes.
            pkt = m.connect_packet(
                self.client_id, self.keepalive, self.clean, self.will, self.user,
                self.password, self.session_expiry,
                self.max_frame + 1 + codec.varlen_size(self.max_frame), self.will_delay)
        else:
            pkt = codec.connect_packet(
                self.client_id, self.keepalive, self.clean, self.will, self.user,
                self.password)
        # With TLS the handshake runs inside this first write.
        await asyncio.wait_for(self._send(pkt), self.timeout)
        self._step = "connack"
        try:
            byte0, body = await asyncio.wait_for(self._read_packet(), self.timeout)
        except (OSError, asyncio.TimeoutError) as e:
            # Closed at our CONNECT, or no answer: a broker that does not speak 5 may do
            # either (amqtt waits for the rest of a 3.1.1 CONNECT). So may a refusing proxy
            # or a dead link: then 3.1.1 fails too, and nothing is remembered. Not on an
            # endpoint that has answered in 5 since the boot.
            if v5 and not self.endpoints[self.ep].get("v5ok") and self._may_downgrade():
                raise _Downgrade()
            raise e
        if byte0 & 0xF0 != codec.CONNACK:
            raise codec.ProtocolError("expected CONNACK")
        if v5:
            present, rc, props = self._v5.decode_connack(body)
            if rc in (1, 0x84) and self._may_downgrade():
                raise _Downgrade()
            if rc:
                ref = props.get(0x1C)
                to = self._v5.server_reference(ref, self.endpoints) if rc in (
                    0x9C, 0x9D) else None
                if ref is not None and to is None:
                    self.log("E", "%s names %r, not one of our brokers: not followed" % (
                        reason_name(rc, True), bytes(ref)))
                raise Refused(rc, True, to)
            self._session_props(props)
            self.endpoints[self.ep]["v5ok"] = True
        else:
            present, rc = codec.decode_connack(body)
            if rc:
                raise Refused(rc)
            self._ka = self.keepalive
            self._rm = 65535
            self._max_out = 0
            self._alias_max = 0
            self.session.window = self._window
        if self._downgrading:
            # 5 was not understood and 3.1.1 was: remembered for this endpoint.
            self._downgrading = False
            self.endpoints[self.ep]["fallback"] = True
            self.stats["downgrades"] += 1
            self.log("W", "%s does not speak MQTT 5: using 3.1.1 from now on" %
                     self.endpoint_name())
            if self.on_protocol:
                self.on_protocol(self.ep, True)
        self._step = "up"
        self.stats["connects"] += 1
        t = self._trouble
        self.outage = o = None
        if t[0] or t[3] or t[4]:
            o = {"failed": t[0], "refused": t[1], "flaps": t[3], "protocol_errors": t[4]}
            if t[2]:
                o["reason"] = t[2]  # the last refusal's
        self._trouble = [0, 0, None, 0, 0]
        if self._last_ep is not None and self._last_ep != self.ep:
            o = o or {}
            o["from"] = self.endpoint_name(self._last_ep)
            if self._moved == 1:
                # From losing the last connection to this one, on another broker.
                o["failover_s"] = round(self.uptime_s() - self._lost_at, 1)
            elif self._moved == 3:
                o["redirected"] = True  # by the broker, to one of ours
            else:
                o["failback"] = True
        self.outage = o
        self._last_ep = self.ep
        self._moved = 0
        self._lost_at = None
        if self.failover:
            self.failover.connected()
        self._last_rx = self.ticks_ms()
        return present

    def _redirect(self, to):
        if self._last_ep is None:
            self._last_ep = self.ep  # the birth names where it was sent from
        self._use(to)
        self._moved = 3
        self.stats["redirects"] += 1

    def _may_downgrade(self):
        e = self.endpoints[self.ep]
        if (e.get("protocol") or self.protocol) != "auto" or self._downgrading:
            return False
        self._downgrading = True
        e["fallback"] = True  # for the one attempt that follows; unset if it fails
        return True

    def _session_props(self, props):
        """A 5 CONNACK's limits for this connection."""
        self._ka = props.get(0x13, self.keepalive)
        if self._ka != self.keepalive:
            self.log("I", "broker sets keepalive %d s (ours %d)" % (self._ka, self.keepalive))
        rm = self._rm = props.get(0x21, 65535)
        self.session.window = rm if rm < self._window else self._window
        self._max_out = props.get(0x27, 0)
        self._alias_max = props.get(0x22, 0)
        a = self._alias_on
        for i in range(len(a)):
            a[i] = 0
        if 0x11 in props and props[0x11] != self.session_expiry:
            self.log("I", "broker keeps the session %d s (asked %d)" % (
                props[0x11], self.session_expiry))

    def _too_big(self, topic, payload, qos):
        if not self.v5:  # (a 5 connection has loaded mqtt.v5)
            return False
        n = codec.publish_size(topic, payload, qos, b"\x00")
        if n <= self._max_out:
            return False
        self.stats["too_big"] += 1
        self.log("E", "message of %d bytes on %s over the broker's maximum packet size %d:"
                      " not sent" % (n, bytes(topic), self._max_out))
        return True

    async def _resume(self, present):
        """After CONNACK: with the session kept, first resend every unacknowledged message
        with DUP and its id (MQTT-4.4.0-1); without it, subscribe first, then send them
        again as new messages. New publishes wait until this is done, so they cannot
        overtake a resend; ones handed over meanwhile go out in the same pass."""
        self._epoch += 1
        if present and not self.clean:
            pass
        else:
            if self._epoch > 1 or self.had_session:
                # We asked it to keep one: it expired (gone longer than session_expiry) or
                # the broker lost it (a restart without persistence, another broker).
                self.log("I", "broker kept no session for us: subscribing, %d message(s) "
                              "sent again as new" % len(self.session))
            if self.subs:
                await self._subscribe_all()
            self.session.renumber()
        if self._max_out:
            # Kept (offline, or for another broker) and too big for this one: never sent
            # to be cut. Counted, and released to the app as failed.
            for m in self.session.pending():
                if self._too_big(m.topic, m.payload, 1):
                    self.session.ack(m.pid)
                    m.failed = "too big"
                    self._space.set()
                    if self.on_ack:
                        self.on_ack(m)
        epoch = self._epoch
        resent = sent = 0
        if self.nodelay:
            # Without Nagle every packet would be a segment of its own: the flight goes out
            # in as few as fit, and the broker answers it in one round trip.
            self._cork = bytearray()
        while True:
            todo = [m for m in self.session.pending() if m.sent != epoch]
            if not todo:
                break
            for m in todo:
                while self._rm < len(self.session) and self._unacked(epoch) >= self._rm:
                    # More kept than the broker takes at once (its Receive Maximum): the
                    # rest follows as acknowledgements come.
                    await self._uncork()
                    self._space.clear()
                    await self._space.wait()
                    if self._dead.is_set():
                        raise OSError("link lost while resending")
                dup = m.sent > 0  # -1: refused by the broker, a new delivery
                if dup:
                    resent += 1
                    self.stats["resends"] += 1
                sent += 1
                await self._send_msg(m, dup)
                if self._dead.is_set():
                    raise OSError("link lost while resending")
        await self._uncork()
        self.connected.set()
        o = self.outage
        self.log("I", "connected (session present: %d, resent: %d, sent: %d)%s" % (
            present, resent, sent, " after %r" % (o,) if o else ""))
        if self.on_connect:
            self.on_connect(present)

    def _unacked(self, epoch):
        """Messages written on this connection and not yet acknowledged: what the broker's
        Receive Maximum counts (not the ones it refused, kept to send again)."""
        n = 0
        for m in self.session._inflight.values():
            if m.sent == epoch:
                n += 1
        return n

    def _kill(self):
        """The link is dead: wake everything that waits on it."""
        self._dead.set()
        self._suback.set()
        self._space.set()

    async def resubscribe(self, topics, qos=1):
        """Subscribe again now (a broker re-sends the retained messages of a repeated
        subscription: MQTT-3.8.4-3); False if not connected or no SUBACK came."""
        if not self.connected.is_set():
            return False
        try:
            await self._subscribe_all([(_b(t), qos) for t in topics])
            return True
        except (OSError, asyncio.TimeoutError):
            return False

    async def _subscribe_all(self, subs=None):
        pid = self.session.next_pid()
        self._sub_pid = pid
        self._subs_sent = subs = subs or self.subs  # to name what a SUBACK refuses
        self._suback.clear()
        if self.v5:
            await self._send(self._v5.subscribe_packet(pid, subs))
        else:
            await self._send(codec.subscribe_packet(pid, subs))
        if asyncio.current_task() is self._rtask:
            # From an inbound handler (the refresh-config command): the SUBACK can only be
            # read once it returns, so waiting here would stall the link for `timeout`.
            return
        await asyncio.wait_for(self._suback.wait(), self.timeout)
        if self._dead.is_set():
            raise OSError("link lost while subscribing")

    async def _close(self):
        self.connected.clear()
        self._cork = None
        w = self._writer
        s = self._sock
        self._writer = self._reader = self._sock = None
        try:
            if w:
                await w.wait_closed()  # closes the socket on MicroPython
            elif s:
                s.close()
        except Exception:
            pass
        w = s = None  # the closed TLS socket must be garbage for the collect in _hold_room
        self._hold_room()

    def _hold_room(self):
        """Take the TLS records' room back (see __init__), right after a close freed them."""
        if self.tls_room and self._room is None:
            gc.collect()
            try:
                self._room = bytearray(self.tls_room)
            except MemoryError:
                pass  # fragmented already: tried again at the handshake

    def _free_room(self):
        """Hand the room to the handshake's records; a handshake without it is a miss
        (health's mqtt.tls_room_misses), which may then fail for want of memory."""
        if self.tls_room:
            self._hold_room()
            if self._room is None:
                self.stats["tls_room_misses"] += 1
        if self._room is not None:
            self._room = None
            gc.collect()

    # ---- reading ---------------------------------------------------------------------

    async def _fill(self, need):
        """Read until `need` unparsed bytes are buffered, moving a partial frame to the
        front when the buffer's tail is too short for it."""
        buf = self._rxmv
        while self._r1 - self._r0 < need:
            if len(buf) - self._r0 < need:
                n = self._r1 - self._r0
                buf[0:n] = buf[self._r0 : self._r1]
                self._r0, self._r1 = 0, n
            k = await self._reader.readinto(buf[self._r1 :])
            if not k:
                raise OSError("connection closed by broker")
            self._r1 += k

    async def _read_packet(self):
        """Next frame from the rx buffer, validated before its body is waited for. The body
        is a memoryview into the buffer, valid until the next read."""
        if self._r1 - self._r0 < 2:
            if self._r0 == self._r1:
                self._r0 = self._r1 = 0
            await self._fill(2)
        buf = self._rxbuf
        byte0 = buf[self._r0]
        vl = self._vl
        vl.reset()
        off = 1
        n = None
        while n is None:
            if self._r1 - self._r0 <= off:
                await self._fill(off + 1)
            n = vl.feed(buf[self._r0 + off])
            off += 1
        if n > self.max_frame and byte0 & 0xF0 == codec.PUBLISH:
            return byte0, await self._drop_big(byte0, off, n)
        codec.check_fixed_header(byte0, n, self.max_frame, self.v5)
        self._last_rx = self.ticks_ms()
        self.stats["rx"] += 1
        if off + n > len(buf):
            return byte0, await self._read_big(off, n)
        if self._r1 - self._r0 < off + n:
            await self._fill(off + n)
        start = self._r0 + off
        self._r0 = start + n
        return byte0, self._rxmv[start : start + n]

    async def _read_big(self, off, n):
        """A frame larger than the rx buffer (and within max_frame): its own buffer, filled
        from what is buffered, then straight from the socket."""
        self.stats["big_frames"] += 1
        big = bytearray(n)
        have = self._r1 - self._r0 - off
        start = self._r0 + off
        big[:have] = self._rxbuf[start : start + have]
        self._r0 = self._r1 = 0
        mv = memoryview(big)
        while have < n:
            k = await self._reader.readinto(mv[have:])
            if not k:
                raise OSError("connection closed by broker")
            have += k
        self._last_rx = self.ticks_ms()
        return mv

    async def _drop_big(self, byte0, off, n):
        """A PUBLISH over max_frame: read past and dropped, never handed to the app, and
        acknowledged. Closing the connection instead would never end: the broker sends it
        again on every reconnect (kept session) or subscription (retained). Returns None."""
        codec.check_fixed_header(byte0, 0, self.max_frame)  # the flags (QoS 3)
        k = min(n, len(self._rxbuf) - off)
        await self._fill(off + k)
        h = self._r0 + off
        # The buffered start of the body holds the topic and packet id (a topic longer
        # than the buffer is a protocol error).
        topic, _, qos, pid, _, _ = codec.decode_publish(byte0 & 0x0F, self._rxmv[h:h + k],
                                                        self.v5)
        self._r0 = h + k
        left = n - k
        while left:
            if self._r0 == self._r1:
                self._r0 = self._r1 = 0
                await self._fill(1)
            t = min(left, self._r1 - self._r0)
            self._r0 += t
            left -= t
        self._last_rx = self.ticks_ms()
        self.stats["oversized"] += 1
        self.log("E", "dropped a message of %d bytes (max_frame %d) on %s" % (
            n, self.max_frame, topic))
        if qos:
            codec.ack_into(self._ackbuf, codec.PUBACK, pid)
            await self._send(self._ackbuf)
        return None

    async def _read_loop(self):
        try:
            buf = self._rxbuf
            while not self._dead.is_set():
                # PUBACKs dominate a pipelined stream: take every one already buffered
                # without a coroutine or a slice per packet.
                # With 5 a success may carry its reason: "no matching subscribers" (0x10)
                # on every message nobody reads at the moment (mosquitto).
                r0 = self._r0
                v5 = self.v5
                while self._r1 - r0 >= 4 and buf[r0] == 0x40:
                    k = buf[r0 + 1]
                    if k != 2 and not (v5 and k == 3 and self._r1 - r0 >= 5
                                       and buf[r0 + 4] < 0x80):
                        break
                    self._r0 = r0 + 2 + k
                    self.stats["rx"] += 1
                    self._acked((buf[r0 + 2] << 8) | buf[r0 + 3])
                    r0 = self._r0
                byte0, body = await self._read_packet()
                await self._dispatch(byte0, body)
        except asyncio.CancelledError:
            pass
        except codec.ProtocolError as e:
            self.stats["protocol_errors"] += 1
            self._trouble[4] += 1
            self.log("E", "protocol error from broker: %s" % e)
        except Exception as e:
            self.log("W", "read failed: %r" % (e,))
        self._kill()

    async def _dispatch(self, byte0, body):
        if body is None:  # dropped (_drop_big)
            return
        ptype = byte0 & 0xF0
        if ptype == codec.PUBLISH:
            topic, payload, qos, pid, dup, retain = codec.decode_publish(
                byte0 & 0x0F, body, self.v5)
            if qos == 2:
                raise codec.ProtocolError("QoS 2 PUBLISH on a QoS 1 subscription")
            if qos == 0 or not self.session.seen_inbound(pid, dup):
                if self.on_message:
                    try:
                        r = self.on_message(topic, payload, retain)
                        if r is not None and hasattr(r, "send"):
                            await r
                    except Exception as e:
                        # Acknowledged all the same: a message that crashes its handler
                        # would otherwise come back on every reconnect, forever.
                        self.stats["handler_errors"] += 1
                        self.log("E", "message handler failed on %s: %r" % (bytes(topic), e))
            if qos == 1:
                # After the handler ran: a crash before this line means a redelivery.
                codec.ack_into(self._ackbuf, codec.PUBACK, pid)
                await self._send(self._ackbuf)
        elif ptype == codec.PUBACK:
            if len(body) > 2 and body[2] >= 0x80:
                self._nacked(codec.decode_pid(body), body[2])
            else:
                self._acked(codec.decode_pid(body))
        elif ptype == codec.SUBACK:
            if self.v5:
                pid, granted = self._v5.decode_suback(body)
            else:
                pid, granted = codec.decode_suback(body)
            if pid == self._sub_pid:
                bad = [(s[0], g) for s, g in zip(self._subs_sent, granted) if g >= 0x80]
                if bad:
                    self.stats["sub_refusals"] += len(bad)
                    self.log("E", "broker refused %d subscription(s): %s" % (len(bad), ", ".join(
                        "%s (%s)" % (bytes(t).decode(), reason_name(g, self.v5))
                        for t, g in bad)))
                self._suback.set()
        elif ptype == codec.PINGRESP:
            pass
        elif ptype == codec.DISCONNECT:  # from a 5 broker: why, and maybe where to go
            rc, props = self._v5.decode_disconnect(body)
            self.stats["server_disconnects"] += 1
            self.last_reason = name = reason_name(rc, True)
            ref = props.get(0x1C)
            to = self._v5.server_reference(ref, self.endpoints) if rc in (
                0x9C, 0x9D) else None
            self._disc = (rc, to)
            self.log("W", "broker disconnected us: %s%s" % (name, "" if ref is None else (
                " (names %s%s)" % (bytes(ref).decode(), "" if to is not None else
                                   ", not one of our brokers: not followed"))))
            raise OSError("disconnected by the broker: " + name)
        else:
            raise codec.ProtocolError("unexpected packet type %d" % (ptype >> 4))

    def _nacked(self, pid, rc):
        """A PUBACK with an error reason (5): the broker did not take the message. It is
        kept, with a new packet id, and sent again at the next keepalive period or
        connection, never dropped; counted."""
        msg = self.session.ack(pid)
        if msg is None:
            return
        self.stats["puback_errors"] += 1
        self.last_reason = name = reason_name(rc, True)
        self.log("W", "broker refused a message on %s: %s; kept to send again" % (
            bytes(msg.topic), name))
        self.session.add(msg, True)
        msg.sent = -1

    def _acked(self, pid):
        msg = self.session.ack(pid)
        if msg is not None:
            self._space.set()
            if msg.done:
                msg.done.set()
            if self.on_ack:
                self.on_ack(msg)

    # ---- writing ---------------------------------------------------------------------

    async def _send(self, pkt):
        await self._write(pkt)

    def _send_publish(self, topic, payload, qos, retain, dup, pid):
        # Encoded straight into the shared tx buffer and written before the caller awaits,
        # so no other publisher can touch the buffer meanwhile. One write per packet: a
        # header sent apart from its payload stalls on Nagle and delayed ACK.
        # Not a coroutine: returns what to await (see _write).
        props = None
        if self.v5:
            # The properties: none, or a topic alias (an established one sends no topic).
            # Inline: a call returning a tuple costs an allocation per message.
            props = b"\x00"
            i = self._alias_of.get(topic)
            if i is not None and i <= self._alias_max:
                props = self._alias_props[i - 1]
                if self._alias_on[i - 1]:
                    topic = b""
                else:
                    self._alias_on[i - 1] = 1
        pkt = codec.publish_view(self._txmv, topic, payload, qos, retain, dup, pid, props)
        if pkt is not None:
            return self._write(pkt)
        return self._send_big(topic, payload, qos, retain, dup, pid, props)

    async def _send_big(self, topic, payload, qos, retain, dup, pid, props=None):
        # Rare (config reports, big commands): two writes under the lock, in order.
        if self._cork:
            await self._uncork()
            self._cork = bytearray()
        off = codec.publish_header_into(self._txbuf, topic, len(payload), qos, retain, dup,
                                        pid, props)
        await self._write_locked(bytes(self._txmv[:off]), payload)
        self.stats["tx"] += 1

    async def _uncork(self):
        buf = self._cork
        self._cork = None
        if buf:
            self.stats["tx"] -= 1  # its packets were counted as they were gathered
            await self._write(buf)

    def _write(self, pkt):
        """Write one whole packet; returns what the caller must await at once (not a
        coroutine: on an MCU each coroutine in the chain costs more than the write).
        Fast path: the socket takes it at once, then the caller yields once for fairness
        (sleep_ms(0), asyncio's singleton: no allocation). If it does not, the rest waits
        in the stream's buffer and is drained under a lock: asyncio streams must never
        drain concurrently, and while a drain is pending every other writer queues behind
        it (with its own copy of the packet)."""
        w = self._writer
        if w is None:
            raise OSError("not connected")
        cork = self._cork
        if cork is not None:
            cork.extend(pkt)  # a copy: the tx buffer is reused for the next packet
            self.stats["tx"] += 1
            if len(cork) < _CORK_MAX:
                return asyncio.sleep_ms(0)
            self._cork = bytearray()
            self.stats["tx"] -= 1
            return self._write_queued(cork)
        if self._gate[1]:
            # The tx buffer is reused while this one waits its turn.
            return self._write_queued(bytes(pkt))
        w.write(pkt)  # sends at once; copies whatever the socket did not take
        if w.out_buf:
            return self._write_queued(None)
        self._last_tx = self.ticks_ms()
        self.stats["tx"] += 1
        return asyncio.sleep_ms(0)

    async def _write_queued(self, pkt):
        await self._write_locked(pkt)
        self._last_tx = self.ticks_ms()
        self.stats["tx"] += 1

    async def _write_locked(self, pkt, more=None):
        gate = self._gate
        w = self._writer
        gate[1] += 1
        try:
            async with gate[0]:
                if w is None or self._writer is not w:
                    raise OSError("not connected")  # the connection changed meanwhile
                if pkt is not None:
                    w.write(pkt)
                if more is not None:
                    w.write(more)
                try:
                    # Bounded: a peer that stops reading must not hold every writer (and
                    # the next connection) forever; closing the socket does not wake a
                    # drain on every port.
                    await asyncio.wait_for(w.drain(), self.timeout)
                except asyncio.TimeoutError:
                    self.log("W", "write stalled for %d s: link dead" % self.timeout)
                    self._kill()
                    raise OSError("write stalled")
                self._last_tx = self.ticks_ms()
        finally:
            gate[1] -= 1

    async def _send_msg(self, msg, dup):
        # Marked before the write: its PUBACK (a refusal, which marks it -1) may be read
        # while the write yields, and must not be overwritten after.
        msg.sent = self._epoch
        try:
            await self._send_publish(msg.topic, msg.payload, 1, msg.retain, dup, msg.pid)
        except OSError:
            # Stays in flight; the next connection resends it.
            self._kill()

    # ---- keepalive ---------------------------------------------------------------------

    async def _keepalive_loop(self):
        """PINGREQ when idle for the keepalive interval; a link silent for 1.5 x keepalive
        is dead even if TCP never says so (a black-holed connection)."""
        ka = self._ka * 1000
        if not ka:
            return
        step = min(1000, ka // 4)
        diff = self.ticks_diff
        woke = self._nack_at = self.ticks_ms()
        while not self._dead.is_set():
            self.beat(step)
            await asyncio.sleep_ms(step)
            now = self.ticks_ms()
            stalled = diff(now, woke) - step
            woke = now
            if stalled > ka // 2:
                # The loop itself did not run (a long flash erase; the Unix board's driven
                # clock): the read loop could not have heard the broker meanwhile, so that
                # time is not the broker's silence. Its silence counts from now.
                self._last_rx = now  # a stale _last_tx makes the ping below check the link
            if diff(now, self._last_rx) >= ka * 3 // 2:
                self.stats["keepalive_timeouts"] += 1
                self.log("W", "no traffic from broker for 1.5 x keepalive: link dead")
                self._kill()
                break
            if self.v5 and diff(now, self._nack_at) >= ka and self.connected.is_set():
                self._nack_at = now
                for m in self.session.pending():
                    if m.sent == -1:  # refused by the broker (_nacked): once per period
                        m.sent = 0
                        asyncio.create_task(self._send_msg(m, False))
            if (
                diff(now, self._last_tx) >= ka
                or diff(now, self._last_rx) >= ka
            ) and self.connected.is_set() and not self._pinging:
                # In its own task: a ping stuck behind a stalled write must not stop this
                # loop from noticing the silence.
                self._pinging = True
                asyncio.create_task(self._ping())

    async def _ping(self):
        try:
            self.stats["pings"] += 1
            await self._send(codec.PINGREQ_PACKET)
        except OSError:
            self._kill()
        finally:
            self._pinging = False


async def reachable(resolve, host, port, timeout):
    """Whether a TCP connection to host:port (any of its addresses) opens within timeout:
    the cheap check of a broker's return (no MQTT session, nothing for it to keep)."""
    try:
        addrs = resolve(host, port)[:_MAX_ADDRS]
    except OSError:
        return False
    for ai in addrs:
        s = socket.socket(ai[0], ai[1], ai[2])
        try:
            await _tcp_connect(s, ai, timeout)
            return True
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            s.close()
    return False


def _resolve(host, port):
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)


def _is_ip(host):
    return ":" in host or all(c in "0123456789." for c in host)


def _no_beat(ms):
    pass


def _no_delay(s):
    opt = getattr(socket, "TCP_NODELAY", None)  # lwIP's value is not Linux's
    level = getattr(socket, "IPPROTO_TCP", None)
    if opt is None or level is None:
        if sys.platform != "linux":
            return
        level, opt = 6, 1  # the Unix port has neither constant
    try:
        s.setsockopt(level, opt, 1)
    except OSError:
        pass  # Nagle stays: slower, not wrong


async def _tcp_connect(s, ai, timeout):
    """Connect socket s to getaddrinfo entry ai without blocking the loop; raise if it
    fails or takes longer than timeout. The caller closes s."""
    s.setblocking(False)
    try:
        s.connect(ai[-1])
    except OSError as e:
        if e.args[0] != EINPROGRESS:
            raise
    await asyncio.wait_for(_writable(s), timeout)


async def _writable(s):
    """Wait for a non-blocking connect to finish; raise if it failed."""
    p = select.poll()
    p.register(s, select.POLLOUT)
    while True:
        ev = p.poll(0)
        if ev:
            if ev[0][1] & (select.POLLERR | select.POLLHUP):
                raise OSError("TCP connect failed")
            return
        await asyncio.sleep_ms(10)
