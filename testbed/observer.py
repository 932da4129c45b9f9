"""A paho-mqtt client that records what devices publish (host-side)."""
import json
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Observer:
    def __init__(self, host, port, topics=("#",), on_message=None, client_id=None, clean=True,
                 auth=None, reconnect=None, keepalive=30, record=True, protocol="3.1.1"):
        """clean=False with a fixed client_id keeps a broker session, so messages published
        while this observer was away are delivered when it comes back. auth: (user, pw).
        reconnect: (first, longest) delay in s between attempts after a lost connection
        (paho's default is 1 s doubling to 2 minutes, long enough to miss a device's backlog
        with a clean session, or to hold up a run's figures with a kept one).
        record=False keeps no list of messages (a long run with on_message only).
        protocol: "3.1.1", "5", or "auto" (5, then 3.1.1 if 5 gets no CONNACK within 3 s);
        with 5, a kept session (clean=False) asks the broker to keep it a day."""
        self.messages = []  # (monotonic time, topic, payload bytes, retain)
        self.cond = threading.Condition()
        self.on_message = on_message
        self.record = record
        self.disconnects = 0  # connections lost, not counting close()
        self._closing = False
        self._where = (host, port, client_id, auth)
        self.clean = clean
        self.v5 = protocol != "3.1.1"
        args = (host, port, topics, client_id, clean, auth, reconnect, keepalive)
        if not self._start(*args, wait=3 if protocol == "auto" else 10):
            if protocol != "auto":
                raise RuntimeError("observer could not subscribe")
            self.c.loop_stop()
            self.c.disconnect()
            self.v5 = False
            if not self._start(*args, wait=10):
                raise RuntimeError("observer could not subscribe")

    def _start(self, host, port, topics, client_id, clean, auth, reconnect, keepalive, wait):
        if self.v5:
            self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                 protocol=mqtt.MQTTv5)
        else:
            self.c = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=clean
            )
        self.c.on_message = self._on_message
        self.c.on_disconnect = self._on_disconnect
        if auth:
            self.c.username_pw_set(*auth)
        if reconnect:
            self.c.reconnect_delay_set(*reconnect)
        self._subscribed = threading.Event()
        self.subacks = 0  # SUBACKs so far: one per (re)connect, as it subscribes on each
        self.c.on_subscribe = self._on_subscribe
        # Subscribe on every connect: after a broker restart without persistence paho
        # reconnects by itself, but the subscriptions are gone.
        subs = [(t, 1) for t in topics]
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(subs)
        if self.v5:
            props = None
            if not clean:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 86400
            self.c.connect(host, port, keepalive=keepalive, clean_start=clean,
                           properties=props)
        else:
            self.c.connect(host, port, keepalive=keepalive)
        self.c.loop_start()
        return self._subscribed.wait(wait)

    def _on_subscribe(self, *args):
        self.subacks += 1
        self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, rc, props=None):
        with self.cond:
            if not self._closing:
                self.disconnects += 1

    def _on_message(self, client, userdata, msg):
        item = (time.monotonic(), msg.topic, msg.payload, msg.retain)
        with self.cond:
            if self.record:
                self.messages.append(item)
            self.cond.notify_all()
        if self.on_message:
            self.on_message(*item)

    def matching(self, topic_suffix):
        with self.cond:
            return [m for m in self.messages if m[1].endswith(topic_suffix)]

    def json(self, topic_suffix):
        return [json.loads(m[2]) for m in self.matching(topic_suffix)]

    def wait(self, predicate, timeout=10.0, what="condition"):
        """Block until predicate(messages) is truthy; return its value."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                v = predicate(self.messages)
                if v:
                    return v
                left = end - time.monotonic()
                if left <= 0:
                    tail = [(m[1], m[2][:120]) for m in self.messages[-15:]]
                    raise AssertionError("timed out waiting for %s; last: %r" % (what, tail))
                self.cond.wait(left)

    def publish(self, topic, payload, qos=1, retain=False):
        self.c.publish(topic, payload, qos, retain).wait_for_publish(10)

    def close(self, forget=False):
        """forget=True with a kept session (clean=False) also ends that session on the
        broker, so nothing more is queued there for an observer that will not return."""
        with self.cond:
            self._closing = True
        self.c.loop_stop()
        self.c.disconnect()
        if forget and not self.clean:
            host, port, client_id, auth = self._where
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                            clean_session=True)  # 3.1.1: ends a session of either version
            if auth:
                c.username_pw_set(*auth)
            try:
                c.connect(host, port, keepalive=10)
                end = time.monotonic() + 5
                while not c.is_connected() and time.monotonic() < end:
                    c.loop(0.1)  # the CONNACK: the broker has dropped the session
                c.disconnect()
            except OSError:
                pass  # the broker is gone: so is the session, unless it persists it
