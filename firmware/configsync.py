# Keeps the config twin in step with the broker. Desired layers arrive on retained topics:
# pushed by the broker (queued while offline with a kept session, or as retained messages
# on a new subscription), never requested because of a (re)connect. Each is merged and
# validated (twin.py), cached on flash when something changed, applied, and the effective
# config goes out retained on config/reported when it differs from the last one sent.
# A safety-net refresh re-subscribes on a per-device random schedule; it also renews the
# command subscription: a broker may claim a session it does not have (amqtt has answered
# session-present 1 for one it had dropped), and the device subscribes at connect only
# when the broker says it has no session. Renewing on this schedule costs a reconnect
# nothing.
import json

from backoff import jittered
from firmware import configcache
from firmware.clock import sleep_s
from firmware.twin import Twin


class ConfigSync:
    def __init__(self, fs, topics, groups, client, rnd, log, apply, base=None, renew=(),
                 extra=()):
        self.fs = fs
        self.topics = topics
        self.client = client
        self.rnd = rnd
        self.log = log
        self.apply = apply  # fn(changed names, effective) -> names that wait for a reboot
        names = ["all"] + [g for g in groups if g != "all"]
        self.twin = Twin(names + ["device"], base, extra)
        self.layer_of = {topics.group_desired(g): g for g in names}
        self.layer_of[topics.desired] = "device"
        self.renew = list(renew)  # other subscriptions (the commands') a refresh renews
        self.cache = "ok"
        self.cache_errors = 0
        self.pending_reboot = []
        self.refreshes = 0
        self._body = None  # last cache body written or read
        self._sent = None  # last reported text published

    def load(self):
        """At boot, before any network: the cached layers, or defaults if there are none."""
        layers, why = configcache.load(self.fs)
        if layers is None:
            self.cache = why
            if why != "missing":
                self.log("W", "config cache unusable (%s): running on defaults" % why)
        else:
            self.twin.restore(layers)
            self._body = json.dumps(layers)
        return self.twin.effective()

    def subscribe(self):
        for t in self.layer_of:
            self.client.subscribe(t, 1)

    def owns(self, topic):
        return topic in self.layer_of

    async def on_message(self, topic, payload, retain):
        layer = self.layer_of[topic]
        had = self.twin.layers.get(layer)
        changed = self.twin.offer(layer, bytes(payload))
        if self.twin.ignored:
            self.log("W", "config from %s ignored: version %d is not newer than the applied %d"
                          " (a broker that lost its retained layers? publish a higher version)"
                     % ((layer,) + self.twin.ignored))
        if changed:
            self.log("I", "config from %s changed %s" % (layer, ",".join(sorted(changed))))
            for k in self.apply(changed, self.twin.effective()):
                if k not in self.pending_reboot:
                    self.pending_reboot.append(k)
        if self.twin.layers.get(layer) is not had:
            # Every new layer version is cached, also one that changes no effective value:
            # the next boot then starts from the versions applied now.
            try:
                self._body = configcache.save(self.fs, self.twin.snapshot(), self._body)
                self.cache = "ok"  # reported says what is on flash now, not at boot
            except OSError as e:
                self.cache_errors += 1
                self.cache = "write failed: %s" % (e,)
                self.log("E", "config cache write failed: %r" % (e,))
        await self.report()

    def reported(self):
        doc = self.twin.reported()
        doc["cache"] = self.cache
        if self.pending_reboot:
            doc["pending_reboot"] = sorted(self.pending_reboot)
        return json.dumps(doc)

    async def report(self, force=False):
        """Publish config/reported (retained) if it changed since the last one sent."""
        text = self.reported()
        if text == self._sent and not force:
            return
        # Noted before the await: a report started meanwhile (the connect's and a layer's
        # arriving at once) then sees this text as sent and does not send it twice.
        last, self._sent = self._sent, text
        try:
            await self.client.publish(self.topics.reported, text, 1, True, wait=False)
        except ValueError as e:  # larger than max_frame: say so rather than nothing
            self.log("E", "config/reported not sent: %s" % e)
            if self._sent is text:
                self._sent = last

    def reported_once(self):
        """config/reported went out in this boot: the config is loaded and applied."""
        return self._sent is not None

    async def refresh(self):
        """Re-subscribe to the config topics (the broker re-sends the retained layers) and
        renew the other subscriptions, in one SUBSCRIBE."""
        # The device's random moment is also when a broker that spoke only 3.1.1 is asked
        # in 5 again, at the next connect (it may have been upgraded).
        self.client.retry_v5()
        if await self.client.resubscribe(list(self.layer_of) + self.renew):
            self.refreshes += 1
            return True
        return False

    async def refresh_loop(self, interval):
        """interval: fn() -> T seconds. First at uniform(0, T), then T * uniform(0.5, 1.5).
        T may be a week: longer than one asyncio sleep may be on a board (clock.sleep_s)."""
        await sleep_s(self.rnd.uniform(0, interval()))
        while True:
            await self.refresh()
            await sleep_s(jittered(interval(), self.rnd))
