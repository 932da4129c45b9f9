"""Fault-injecting TCP proxy between devices and the broker (host side, CPython asyncio).

It runs its own event loop in a thread, so tests and the simulators drive it with plain
method calls: cut every connection, refuse new ones, black-hole traffic (stop forwarding
without closing, as a dead route does), add latency, cap the bandwidth (bytes per second in
each direction of each connection, as a slow radio link), or admit at most R new
connections per second. It records every connection attempt and every MQTT packet it
forwards, by type and direction, from the fixed headers (plus the packet id and DUP flag of
PUBLISH and SUBSCRIBE), so a test can assert what went over the wire rather than what a log
says.
"""
import asyncio
import random
import socket
import struct
import threading
import time

NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT",
}
UP = "up"  # device -> broker
DOWN = "down"  # broker -> device


# MQTT 5 property sizes (1, 2, 4 bytes; 0 varint; 5 string/binary; 6 string pair).
_PROP_SIZES = {
    0x01: 1, 0x17: 1, 0x19: 1, 0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1,
    0x13: 2, 0x21: 2, 0x22: 2, 0x23: 2, 0x02: 4, 0x11: 4, 0x18: 4, 0x27: 4, 0x0B: 0,
    0x03: 5, 0x08: 5, 0x09: 5, 0x12: 5, 0x15: 5, 0x16: 5, 0x1A: 5, 0x1C: 5, 0x1F: 5,
    0x26: 6,
}


def _varint(body, off):
    v, shift = 0, 0
    while True:
        b = body[off]
        off += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            return v, off
        shift += 7


def read_props(body, off):
    """An MQTT 5 property section at body[off:]: ({id: value}, offset after it)."""
    n, off = _varint(body, off)
    end = off + n
    props = {}
    while off < end:
        pid = body[off]
        off += 1
        size = _PROP_SIZES[pid]
        if size == 0:
            v, off = _varint(body, off)
        elif size < 5:
            v = int.from_bytes(body[off:off + size], "big")
            off += size
        else:
            v = []
            for _ in range(size - 4):
                k = struct.unpack_from(">H", body, off)[0]
                v.append(bytes(body[off + 2:off + 2 + k]).decode("utf-8", "replace"))
                off += 2 + k
            v = v[0] if size == 5 else tuple(v)
        props[pid] = v
    return props, end


class Packet:
    """One MQTT packet as seen on the wire, 3.1.1 or 5 (per connection, from its CONNECT).
    With 5, `props` holds the properties of CONNECT, CONNACK, PUBLISH, PUBACK and
    DISCONNECT, and a PUBLISH sent with an established Topic Alias gets its topic back
    (`alias` says which)."""

    __slots__ = ("t", "conn", "dir", "type", "dup", "qos", "pid", "topic", "client_id", "clean",
                 "rc", "present", "filters", "version", "props", "alias", "size")

    def __init__(self, t, conn, direction, ptype, flags, body, state=None):
        state = state if state is not None else {}
        v5 = state.get("version") == 5
        self.version = state.get("version")
        self.props = None
        self.alias = None
        self.size = len(body)
        self.t = t
        self.conn = conn
        self.dir = direction
        self.type = NAMES.get(ptype, str(ptype))
        self.dup = bool(flags & 8)
        self.qos = (flags >> 1) & 3
        self.pid = None
        self.topic = None
        self.client_id = None
        self.clean = None
        self.rc = None
        self.present = None
        self.filters = None  # SUBSCRIBE: the topic filters asked for
        try:
            if ptype == 3:
                n = struct.unpack_from(">H", body)[0]
                self.topic = bytes(body[2:2 + n]).decode("utf-8", "replace")
                off = 2 + n
                if self.qos:
                    self.pid = struct.unpack_from(">H", body, 2 + n)[0]
                    off += 2
                if v5:
                    self.props = read_props(body, off)[0]
                    a = self.props.get(0x23)
                    if a is not None:
                        self.alias = a
                        aliases = state.setdefault("aliases", {})
                        if n:
                            aliases[(direction, a)] = self.topic
                        else:
                            self.topic = aliases.get((direction, a))
            elif ptype == 2:
                self.present = bool(body[0] & 1)
                self.rc = body[1]
                if v5 and len(body) > 2:
                    self.props = read_props(body, 2)[0]
            elif ptype == 14:
                self.rc = body[0] if len(body) else 0
                if v5 and len(body) > 1:
                    self.props = read_props(body, 1)[0]
            elif ptype in (4, 8, 9):
                self.pid = struct.unpack_from(">H", body)[0]
                if ptype == 4:
                    self.rc = body[2] if len(body) > 2 else 0
                    if v5 and len(body) > 3:
                        self.props = read_props(body, 3)[0]
                if ptype == 8:
                    self.filters = []
                    off = 2
                    if v5:
                        off = read_props(body, 2)[1]
                    while off + 2 <= len(body):
                        n = struct.unpack_from(">H", body, off)[0]
                        self.filters.append(bytes(body[off + 2:off + 2 + n]).decode("utf-8", "replace"))
                        off += 2 + n + 1  # the filter, then its requested QoS byte
            elif ptype == 1:
                n = struct.unpack_from(">H", body)[0]  # protocol name, then level, flags, keepalive
                self.version = state["version"] = body[2 + n]
                self.clean = bool(body[2 + n + 1] & 2)
                off = 2 + n + 4
                if self.version == 5:
                    self.props, off = read_props(body, off)
                k = struct.unpack_from(">H", body, off)[0]
                self.client_id = bytes(body[off + 2:off + 2 + k]).decode("utf-8", "replace")
        except (struct.error, IndexError, KeyError):
            pass  # a malformed packet is still counted by type

    def __repr__(self):
        return "<%s %s pid=%s dup=%d conn=%d>" % (self.dir, self.type, self.pid, self.dup, self.conn)


class _Framer:
    """Splits one direction of a byte stream into MQTT frames (header + body)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            n, mult, i = 0, 1, 1
            while True:
                if i >= len(self.buf):
                    return out
                b = self.buf[i]
                n += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80 or i > 4:
                    break
            if len(self.buf) < i + n:
                return out
            out.append((self.buf[0], bytes(self.buf[i:i + n])))
            del self.buf[:i + n]
        return out


# Packet types a "control" record leaves out: the telemetry stream and its acknowledgements,
# which a fleet of a thousand devices sends by the hundred thousand.
_BULK = (3, 4)


class FaultProxy:
    def __init__(self, upstream_host, upstream_port, host="127.0.0.1", port=0, record=True):
        """record: True keeps every packet, "control" all but PUBLISH and PUBACK (for long
        fleet runs: connects, subscribes, pings), False none (connection attempts only)."""
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port
        self.record = record
        self.clients = {}  # connection id -> MQTT client id of its CONNECT (when recording)
        self.last_cut = []  # client ids of the connections the last cut() closed
        # connection id -> time of its first PUBLISH from the device (when recording): what
        # a device sends before it is part of setting up the session
        self.first_publish = {}
        self.attempts = []  # (monotonic time, outcome) outcome: "accepted" | "refused"
        self.packets = []  # Packet, in the order the proxy forwarded them
        self._refusing = False
        self._blackhole = None  # None, "both", UP or DOWN
        self._latency = 0.0
        self._bandwidth = None  # bytes per second, each direction of each connection
        self._rate = None  # max new connections admitted per second
        self._window = []  # admission times within the last second (rate limit)
        self._conns = {}  # id -> (device writer, broker writer)
        self._poisoned = set()  # connections that lost bytes to the black hole
        self._next_id = 0
        self._loop = None
        self._server = None
        self._thread = None
        self._lock = threading.Lock()

    # ---- lifecycle -----------------------------------------------------------------

    def start(self):
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="fault-proxy")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    async def _start(self):
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self):
        if not self._loop:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    async def _shutdown(self):
        if self._server is not None:
            self._server.close()
        await self._cut_all()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ---- faults --------------------------------------------------------------------

    def cut(self, fraction=1.0, rnd=None):
        """Close every open connection (both sides), or a random `fraction` of them chosen
        with `rnd` (a random.Random); returns how many were cut."""
        return self._call(self._cut_all(fraction, rnd))

    def refuse(self, on=True):
        """Accept new connections only to close them at once (the device sees a reset)."""
        self._refusing = on

    def listen(self, on=True):
        """listen(False) closes the listening socket: a new connection is refused by the
        host's TCP itself, as at a broker host whose broker is down, so even a bare TCP
        connect (a failover probe) fails, where refuse() completes the handshake first and
        then resets. Such attempts never reach the proxy and are not recorded. listen(True)
        listens again on the same port. Open connections are left alone (cut() them)."""
        self._call(self._listen(on))

    async def _listen(self, on):
        if on and self._server is None:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.port, backlog=4096)
        elif not on and self._server is not None:
            # Not wait_closed(): from 3.12 it waits for every open connection to end.
            self._server.close()
            self._server = None

    def blackhole(self, on=True, direction=None):
        """Stop forwarding (in `direction`, UP or DOWN, default both) on every connection,
        old and new, without
        closing anything: no FIN, no RST, the bytes just vanish. Lifting it closes the
        connections that lost bytes: unlike a real route, the proxy cannot retransmit them,
        and forwarding the rest would hand the broker a corrupt stream."""
        self._blackhole = (direction or "both") if on else None
        if not on and self._loop:
            self._call(self._cut_poisoned())

    def latency(self, seconds):
        """Delay every forwarded chunk by this much, in both directions."""
        self._latency = seconds

    def bandwidth(self, bytes_per_s):
        """Cap every connection at this many bytes per second in each direction (None: no
        cap), old connections and new. What is not yet forwarded waits in the proxy's read
        buffer and the socket buffers, so a sender that outruns the cap for long sees its
        writes back up, as on a slow link. Applies on top of latency()."""
        self._bandwidth = bytes_per_s

    def rate_limit(self, per_second):
        """Admit at most this many new connections per second; refuse the rest (None: off)."""
        self._rate = per_second

    # ---- observations --------------------------------------------------------------

    @property
    def open_connections(self):
        return len(self._conns)

    def connected_clients(self):
        """{MQTT client id: connection id} of the open connections that sent a CONNECT
        (when recording)."""
        return {self.clients[cid]: cid for cid in list(self._conns) if cid in self.clients}

    def mark(self):
        """Position in the packet and attempt records, for 'what happened after this'."""
        return len(self.packets), len(self.attempts), time.monotonic()

    def packets_since(self, mark, ptype=None, direction=None):
        return [p for p in self.packets[mark[0]:]
                if (ptype is None or p.type == ptype) and (direction is None or p.dir == direction)]

    def attempts_since(self, mark, outcome=None):
        return [a for a in self.attempts[mark[1]:] if outcome is None or a[1] == outcome]

    def count(self, ptype, direction=None):
        return sum(1 for p in self.packets
                   if p.type == ptype and (direction is None or p.dir == direction))

    # ---- forwarding ----------------------------------------------------------------

    async def _accept(self, dreader, dwriter):
        now = time.monotonic()
        admit = not self._refusing
        if admit and self._rate is not None:
            self._window = [t for t in self._window if now - t < 1.0]
            admit = len(self._window) < self._rate
            if admit:
                self._window.append(now)
        self.attempts.append((now, "accepted" if admit else "refused"))
        if not admit:
            _reset(dwriter)
            return
        try:
            breader, bwriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(dwriter)
            return
        self._next_id += 1
        cid = self._next_id
        self._conns[cid] = (dwriter, bwriter)
        state = {}  # what both directions' records share: protocol version, topic aliases
        try:
            await asyncio.gather(
                self._pump(cid, UP, dreader, bwriter, state),
                self._pump(cid, DOWN, breader, dwriter, state),
            )
        finally:
            self._conns.pop(cid, None)
            for w in (dwriter, bwriter):
                w.close()

    async def _pump(self, cid, direction, reader, writer, state):
        framer = _Framer() if self.record else None
        due = 0.0  # bandwidth cap: when the bytes forwarded so far have had their time
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self._latency:
                    await asyncio.sleep(self._latency)
                bh = self._blackhole
                if bh and (bh == "both" or bh == direction):
                    self._poisoned.add(cid)
                    continue
                if not self._bandwidth:
                    await self._forward(cid, direction, framer, writer, data, state)
                    continue
                # Capped: out in slices of a tenth of a second's worth, each once the bytes
                # before it have had their time on the wire (no read meanwhile, so a sender
                # that outruns the cap backs up). Faults set meanwhile apply to the rest.
                off = 0
                while off < len(data):
                    bw = self._bandwidth
                    if not bw:
                        await self._forward(cid, direction, framer, writer, data[off:], state)
                        break
                    piece = data[off:off + max(1, int(bw // 10))]
                    off += len(piece)
                    now = time.monotonic()
                    due = max(due, now) + len(piece) / bw
                    await asyncio.sleep(due - now)
                    bh = self._blackhole
                    if bh and (bh == "both" or bh == direction):
                        self._poisoned.add(cid)
                        break
                    await self._forward(cid, direction, framer, writer, piece, state)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            # One side ended: end the other too, as a real TCP path would after a close.
            writer.close()

    async def _forward(self, cid, direction, framer, writer, data, state):
        if framer is not None:
            t = time.monotonic()
            for byte0, body in framer.feed(data):
                if byte0 >> 4 == 3 and direction == UP and cid not in self.first_publish:
                    self.first_publish[cid] = t
                if self.record == "control" and byte0 >> 4 in _BULK:
                    continue
                pkt = Packet(t, cid, direction, byte0 >> 4, byte0 & 15, body, state)
                if pkt.client_id is not None:
                    self.clients[cid] = pkt.client_id
                self.packets.append(pkt)
        writer.write(data)
        await writer.drain()

    async def _cut_poisoned(self):
        for cid in list(self._poisoned):
            ws = self._conns.pop(cid, None)
            if ws:
                ws[0].close()
                ws[1].close()
        self._poisoned.clear()

    async def _cut_all(self, fraction=1.0, rnd=None):
        ids = list(self._conns)
        if fraction < 1.0:
            ids = (rnd or random).sample(ids, round(len(ids) * fraction))
        self.last_cut = [self.clients.get(cid) for cid in ids]
        for cid in ids:
            dw, bw = self._conns.pop(cid)
            dw.close()
            bw.close()
        await asyncio.sleep(0)
        return len(ids)


def _reset(writer):
    """Close with RST instead of FIN, as a refusing host does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.close()


def round_trips(packets):
    """How many times a device waited on the broker in one connection's packets (in the
    order forwarded): once per CONNECT, SUBSCRIBE or PINGREQ, and once per flight of
    PUBLISHes, a flight ending when every PUBLISH sent so far is acknowledged (a PUBLISH
    sent with nothing outstanding waited for the answers before it). A DISCONNECT awaits
    nothing."""
    n = 0
    out = set()
    for p in packets:
        if p.dir == UP:
            if p.type in ("CONNECT", "SUBSCRIBE", "PINGREQ"):
                n += 1
            elif p.type == "PUBLISH" and p.qos:
                if not out:
                    n += 1
                out.add(p.pid)
        elif p.type == "PUBACK":
            out.discard(p.pid)
    return n
