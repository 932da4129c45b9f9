# MQTT session state that outlives a TCP connection: packet ids, the QoS 1 in-flight window
# and inbound duplicate detection. Pure (no I/O), so resume/resend rules are unit-tested here.


class Message:
    """An outbound PUBLISH kept until its PUBACK. token is the app's handle (e.g. a queue
    position) returned to it on acknowledgement."""

    __slots__ = ("topic", "payload", "qos", "retain", "pid", "order", "token", "sent", "done",
                 "failed")

    def __init__(self, topic, payload, qos, retain, token=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.pid = 0
        self.order = 0
        self.token = token
        self.done = None  # an Event set on PUBACK, for a publisher that waits for it
        # Number of the connection it was last written on (0: never). Written on an earlier
        # one means a resend, which carries DUP; -1: refused by the broker, to send again.
        self.sent = 0
        self.failed = None  # why it was released undelivered (too big for the broker)


class Session:
    """In-flight QoS 1 window (bounded by `window` messages) and packet-id allocation.

    Packet ids run 1..65535, wrap, and skip ids still in flight (MQTT-2.3.1-2). A message
    keeps its id until acknowledged, so a resend after reconnect reuses it (MQTT-4.4.0-1).
    """

    def __init__(self, window=16, dedup=32):
        self.window = window
        self._inflight = {}  # pid -> Message
        self._next = 0
        self._order = 0
        # Inbound QoS 1 ids already handed to the app, oldest overwritten first (bounded).
        self._seen = [0] * dedup
        self._seen_at = 0

    def __len__(self):
        return len(self._inflight)

    def full(self):
        return len(self._inflight) >= self.window

    def next_pid(self):
        """Next free packet id; never 0, never one in flight."""
        for _ in range(65535):
            self._next = self._next % 65535 + 1
            if self._next not in self._inflight:
                return self._next
        raise RuntimeError("no free packet id")

    def add(self, msg, over=False):
        """Put a QoS 1 message in flight; assigns its packet id. Caller checks full(), or
        says `over` (a message that must not wait for room goes beyond the window)."""
        if self.full() and not over:
            raise RuntimeError("in-flight window full")
        msg.pid = self.next_pid()
        self._order += 1
        msg.order = self._order
        msg.sent = 0
        self._inflight[msg.pid] = msg
        return msg.pid

    def ack(self, pid):
        """PUBACK received: return the acknowledged Message, or None for an unknown id."""
        return self._inflight.pop(pid, None)

    def pending(self):
        """In-flight messages in the order they were first handed over."""
        msgs = list(self._inflight.values())
        msgs.sort(key=_by_order)
        return msgs

    def renumber(self):
        """Broker lost the session (session-present = 0): the old ids mean nothing to it, so
        the unacknowledged messages go out again as new messages with fresh ids, in order."""
        msgs = self.pending()
        self._inflight = {}
        for m in msgs:
            m.pid = self.next_pid()
            m.sent = 0
            self._inflight[m.pid] = m
        return msgs

    def seen_inbound(self, pid, dup):
        """Record an inbound QoS 1 id; True if it is a redelivery already handed to the app.
        Only a DUP-flagged PUBLISH can be a redelivery: without DUP, a reused id is new."""
        if dup and pid in self._seen:
            return True
        self._seen[self._seen_at] = pid
        self._seen_at = (self._seen_at + 1) % len(self._seen)
        return False


def _by_order(m):
    return m.order
