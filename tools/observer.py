"""A paho-mqtt client that records what devices publish (host-side)."""
import json
import threading
import time

import paho.mqtt.client as mqtt


class Observer:
    def __init__(self, host, port, topics=("#",), on_message=None, client_id=None, clean=True,
                 auth=None):
        """clean=False with a fixed client_id keeps a broker session, so messages published
        while this observer was away are delivered when it comes back. auth: (user, pw)."""
        self.messages = []  # (monotonic time, topic, payload bytes, retain)
        self.cond = threading.Condition()
        self.on_message = on_message
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=clean
        )
        self.c.on_message = self._on_message
        if auth:
            self.c.username_pw_set(*auth)
        self._subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: self._subscribed.set()
        # Subscribe on every connect: after a broker restart without persistence paho
        # reconnects by itself, but the subscriptions are gone.
        subs = [(t, 1) for t in topics]
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(subs)
        self.c.connect(host, port, keepalive=30)
        self.c.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("observer could not subscribe")

    def _on_message(self, client, userdata, msg):
        item = (time.monotonic(), msg.topic, msg.payload, msg.retain)
        with self.cond:
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

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()
