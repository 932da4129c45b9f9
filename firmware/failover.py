# Broker failover: which of the configured brokers the MQTT client uses. It moves to the next
# one after `after_attempts` failed attempts in a row or `after_s` s of failing ones; on a
# secondary it checks now and then (jittered per device) whether the primary answers again,
# and returns at a random moment within `failback_window_s`, so a primary that comes back
# does not get the whole fleet in one second. The session does not carry over: the new
# broker says session-present = 0 and the client subscribes and resends what is unacked.
import asyncio

from backoff import jittered
from firmware.clock import sleep_s
from mqtt.client import reachable

BASELINE_PROBE_S = 2.0


class Failover:
    def __init__(self, cfg, rnd, uptime_s, log, baseline=False, leaving=None):
        self.after_attempts = cfg["after_attempts"]
        self.after_s = cfg["after_s"]
        self.probe_s = cfg["probe_s"]
        self.window_s = cfg["failback_window_s"]
        # The naive client's pattern, for storm comparisons: the next broker after every
        # failed attempt, the primary polled every 2 s in step, and back the moment it answers.
        self.baseline = baseline
        if baseline:
            self.after_attempts = 1
            self.window_s = 0
        self.rnd = rnd
        self.uptime_s = uptime_s
        self.log = log
        self.leaving = leaving  # fn() -> (topic, payload, retain) said to a broker we leave
        self.client = None  # the MQTTClient, wired by the device
        self.stats = {"probes": 0, "probes_ok": 0}
        self._streak = 0
        self._since = None
        self._away = asyncio.Event()  # set while on a secondary
        # The endpoint a fail-back left, until the primary's first connect succeeds: a
        # primary that passes the TCP probe but does not serve MQTT (a load balancer in front
        # of a dead broker) sends the device straight back, not after after_s of failures.
        self._trial = None

    # ---- called by the client -------------------------------------------------------

    def failed(self):
        """After a failed attempt: the endpoint to move to, or None to retry this one."""
        if self._trial is not None:
            i, self._trial = self._trial, None
            self.log("W", "primary broker answered the probe but not MQTT: back to %s"
                     % self.client.endpoint_name(i))
            return i
        now = self.uptime_s()
        if self._since is None:
            self._since = now
        self._streak += 1
        c = self.client
        if len(c.endpoints) < 2:
            return None
        if self._streak < self.after_attempts and now - self._since < self.after_s:
            return None
        self._streak = 0
        self._since = None
        nxt = (c.ep + 1) % len(c.endpoints)
        if nxt:
            self._away.set()
        return nxt

    def connected(self):
        self._trial = None
        self._streak = 0
        self._since = None
        if self.client.ep:
            self._away.set()

    def link_waited(self):
        # The network (Wi-Fi) was down: the failures before say nothing about the broker.
        self._streak = 0
        self._since = None

    # ---- the probe task -------------------------------------------------------------

    async def _probe(self):
        c = self.client
        e = c.endpoints[0]
        self.stats["probes"] += 1
        ok = await reachable(c.resolve, e["host"], e["port"], c.timeout)
        if ok:
            self.stats["probes_ok"] += 1
        return ok

    async def run(self):
        """While on a secondary: probe the primary every probe_s (jittered); once it
        answers, move back at a random moment within the window, if it still answers."""
        c = self.client
        while True:
            if c.ep == 0:
                self._away.clear()
                await self._away.wait()
                continue
            await sleep_s(BASELINE_PROBE_S if self.baseline else jittered(self.probe_s, self.rnd))
            if c.ep == 0 or not await self._probe():
                continue
            d = self.rnd.uniform(0, self.window_s)
            self.log("I", "primary broker %s answers again: moving back in %.1f s"
                     % (c.endpoint_name(0), d))
            await sleep_s(d)
            if c.ep == 0:
                continue
            if d and not await self._probe():
                self.log("W", "primary broker %s gone again: staying on %s"
                         % (c.endpoint_name(0), c.endpoint_name()))
                continue
            self._trial = c.ep
            await c.move_to(0, self.leaving() if self.leaving else None)
