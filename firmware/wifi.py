# Link supervision: join the first reachable network of the configured list (priority order,
# bounded wait each), notice a loss from the link status, and join again with the same
# jittered backoff as MQTT, so a site whose access point comes back is not rushed by every
# device at once. MQTT waits on `up` and is told at once when the link goes, instead of
# finding out a keepalive later or burning connect attempts on a link that is not there.
import asyncio

from micropython import const

_POLL_MS = const(250)
_CHECK_MS = const(1000)


class LinkSupervisor:
    def __init__(self, link, networks, backoff, log, uptime_s, on_down=None, beat=None,
                 join_timeout_ms=15000):
        self.link = link  # connect(ssid, pw), isconnected(), disconnect(), rssi()
        # No networks configured: the board's own link (the host's network on Unix).
        self.networks = networks or [(None, None)]
        self.backoff = backoff
        self.log = log
        self.uptime_s = uptime_s  # fn() -> wrap-free seconds: a link can stay up for weeks
        self.on_down = on_down  # fn(): the link just went
        self.beat = beat or (lambda ms: None)
        self.join_timeout_ms = join_timeout_ms
        self.up = asyncio.Event()
        self.ssid = None
        self.stats = {"joins": 0, "join_failures": 0, "losses": 0}

    async def run(self):
        bo = self.backoff
        while True:
            if not await self._join():
                self.stats["join_failures"] += 1
                d = bo.next_delay()
                self.log("W", "no network reachable; retry in %.1f s" % d)
                self.beat(int(d * 1000))
                await asyncio.sleep(d)
                continue
            since = self.uptime_s()
            self.up.set()
            while self.link.isconnected():
                self.beat(_CHECK_MS)
                await asyncio.sleep_ms(_CHECK_MS)
            self.up.clear()
            self.stats["losses"] += 1
            lasted = self.uptime_s() - since
            d = bo.dropped(lasted)
            self.log("W", "link to %s lost after %.1f s; rejoin in %.1f s" % (
                self.ssid, lasted, d))
            if self.on_down:
                self.on_down()
            self.beat(int(d * 1000))
            await asyncio.sleep(d)

    async def _join(self):
        for ssid, password in self.networks:
            self.link.connect(ssid, password)
            waited = 0
            while waited < self.join_timeout_ms:
                if self.link.isconnected():
                    self.ssid = ssid
                    self.stats["joins"] += 1
                    if ssid is not None:
                        self.log("I", "joined %s (rssi %s)" % (ssid, self.link.rssi()))
                    return True
                self.beat(_POLL_MS)
                await asyncio.sleep_ms(_POLL_MS)
                waited += _POLL_MS
            self.link.disconnect()
        return False
