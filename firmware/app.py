# The device: built from a board object, no module-level state, so one process can run many.
# Boot order: bootstrap config from flash (retried, never a crash loop), boot counter, then
# the MQTT connection task and the telemetry task on one asyncio loop.
import asyncio
import json
import time

from backoff import Backoff, Rng
from mqtt.client import MQTTClient
from outbox.outbox import Outbox
from firmware import bootconfig, bootlog, settings
from firmware.commands import Commands
from firmware.configsync import ConfigSync
from firmware.health import Health, LogRing
from firmware.telemetry import Telemetry
from firmware.topics import Topics
from firmware.version import FW_VERSION, SCHEMA

CONFIG_RETRY_S = 5
_LEVELS = "DIWE"  # debug, info, warn, error: log lines carry the letter


class Device:
    def __init__(self, board, config_retry_s=CONFIG_RETRY_S):
        self.board = board
        self.config_retry_s = config_retry_s
        self.rnd = Rng(board.entropy())
        self.name = board.label
        self.cfg = None
        self.ssl = None
        self.client = None
        self.outbox = None
        self.telemetry = None
        self.boot = 0
        self.sync = None
        self.health = None
        self.logring = LogRing()
        self._min_level = 1  # index in _LEVELS: info
        self._reported_once = False
        self._rebooting = False
        self._restart = asyncio.Event()
        self._reboot_task = None
        self._tasks = []

    def log(self, level, msg):
        if _LEVELS.find(level) >= self._min_level:
            line = "%s %s %s" % (self.name, level, msg)
            self.logring.add(line)
            self.board.log(line)

    async def load_config(self):
        """Bootstrap config, waiting for a valid one: a missing or bad file is logged once
        (and again only if the error changes), then re-read every config_retry_s."""
        last = None
        while True:
            try:
                cfg = bootconfig.load(self.board.fs)
                tls = cfg["broker"].get("tls")
                if tls:
                    from firmware import tlsctx  # ssl costs heap; only devices using TLS pay

                    self.ssl = tlsctx.context(self.board.fs, tls)
                return cfg
            except bootconfig.ConfigError as e:
                if str(e) != last:
                    last = str(e)
                    self.log("E", "bootstrap config: %s; retrying every %d s" % (e, self.config_retry_s))
            await asyncio.sleep(self.config_retry_s)

    def _status(self, state, outage=None):
        d = {"v": SCHEMA, "state": state, "boot": self.boot, "fw": FW_VERSION}
        if outage:
            # Refusals and flaps since the previous connection, reported now that we can.
            d["outage"] = outage
        return json.dumps(d)

    def build(self, cfg):
        """Wire the tasks for a validated config: reads the config cache from flash, starts
        nothing, touches no network."""
        self.cfg = cfg
        self.name = cfg["device_id"]
        self.topics = Topics(cfg["prefix"], cfg["device_id"])
        b = cfg["broker"]
        r = b["reconnect"]
        o = cfg["outbox"]
        tls = b.get("tls") or {}
        self.commands = Commands(
            self.topics, self._publish_q1, self.board.uptime_ms,
            {"refresh-config": self._cmd_refresh, "report": self._cmd_report,
             "reboot": self._cmd_reboot, "logs": self._cmd_logs},
            fs=self.board.fs,
        )
        self.client = MQTTClient(
            cfg["device_id"],
            b["host"],
            b["port"],
            keepalive=b["keepalive"],
            clean=False,
            will=(self.topics.status, json.dumps({"v": SCHEMA, "state": "offline"}), 1, True),
            user=b["user"],
            password=b["password"],
            ssl=self.ssl,
            server_hostname=tls.get("server_hostname"),
            window=b["window"],
            max_frame=b["max_frame"],
            timeout=b["timeout"],
            backoff=Backoff(self.rnd, **r),
            ticks_ms=self.board.ticks_ms,
            log=self.log,
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_ack=self._on_ack,
        )
        self.client.subscribe(self.topics.cmd_filter, 1)
        # The bootstrap config's values sit below every desired layer.
        base = {
            "telemetry_interval": cfg["telemetry_interval"],
            "refresh_interval": cfg["refresh_interval"],
            "health_interval": cfg["health_interval"],
            "reconnect.base": r["base"],
            "reconnect.cap": r["cap"],
            "reconnect.first_window": r["first_window"],
            "outbox.policy": o["policy"],
            "outbox.ram_bytes": o["ram_bytes"],
            "outbox.flash_bytes": o["flash_bytes"],
        }
        self.sync = ConfigSync(self.board.fs, self.topics, cfg["groups"], self.client,
                               self.rnd, self.log, self._apply, base)
        self.sync.subscribe()
        eff = self.sync.load()  # the cached config, from the first moment of the boot
        self.outbox = Outbox(
            self.board.fs if eff["outbox.flash_bytes"] else None,
            ram_bytes=eff["outbox.ram_bytes"], flash_bytes=eff["outbox.flash_bytes"],
            policy=eff["outbox.policy"], overflow=o["overflow"], spill_ms=o["spill_ms"],
            ticks_ms=self.board.ticks_ms, ticks_diff=time.ticks_diff, log=self.log,
            topic=self.topics.telemetry,
        )
        self._queued = asyncio.Event()
        self.telemetry = Telemetry(
            self.board, self.rnd, self._enqueue, self.topics.telemetry, self.boot,
            eff["telemetry_interval"], dropped=self._dropped,
        )
        self.health = Health(self, lambda: self.sync.twin.effective()["health_interval"],
                             self.rnd)
        self._apply([s[0] for s in settings.SETTINGS if s[5]], eff)

    def _apply(self, changed, eff):
        """Put new effective settings to work; returns those that wait for a reboot."""
        if self.telemetry:
            self.telemetry.interval = eff["telemetry_interval"]
        bo = self.client.backoff
        bo.base = eff["reconnect.base"]
        bo.cap = eff["reconnect.cap"]
        bo.first_window = eff["reconnect.first_window"]
        self._min_level = "diwe".find(eff["log_level"][0])
        return [k for k in changed if not settings.find(k)[5]]

    async def _on_message(self, topic, payload, retain):
        try:
            t = bytes(topic).decode()
        except UnicodeError:
            t = ""
        if self.sync.owns(t):
            await self.sync.on_message(t, payload, retain)
        elif t.startswith(self.topics.cmd_prefix) and "/" not in t[len(self.topics.cmd_prefix):]:
            await self.commands.on_message(topic, payload, retain)
        else:
            # Not a topic of this device (a broker or ACL mistake): never acted on.
            self.commands.rejected += 1
            self.log("W", "message on a foreign topic ignored: %r" % (t[:80],))

    async def _cmd_refresh(self, body):
        return {"refreshed": await self.sync.refresh()}

    async def _cmd_reboot(self, body):
        # After the answer and the PUBACK have gone out: a graceful stop, then the reset.
        self._reboot_task = asyncio.create_task(self._reboot(0.5))
        return {"rebooting": True}

    async def _reboot(self, delay):
        await asyncio.sleep(delay)
        self.log("W", "rebooting on command")
        self._rebooting = True
        await self.stop()
        self.board.reset()  # a board never comes back from this; the Unix port does
        self._restart.set()

    async def _cmd_report(self, body):
        """Publish reported and health now."""
        await self.sync.report(force=True)
        return {"health": await self.health.publish()}

    async def _cmd_logs(self, body):
        n = body.get("n", 20)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            n = 20
        lines = self.logring.last(n)
        # The answer must fit a frame: drop the oldest lines until it does.
        while lines and sum(len(x) + 4 for x in lines) > 3000:
            lines.pop(0)
        return {"lines": lines}

    def _on_connect(self, session_present):
        # Birth message: retained, so a late subscriber sees the device online at once.
        asyncio.create_task(
            self.client.publish(
                self.topics.status, self._status("online", self.client.outage), 1, True, wait=False
            )
        )
        if not self._reported_once:
            # Once per boot; after that config/reported goes out only when it changes.
            self._reported_once = True
            asyncio.create_task(self.sync.report(force=True))

    async def _publish_q1(self, topic, payload):
        await self.client.publish(topic, payload, 1, False, wait=False)

    # ---- outbox: telemetry waits there for its PUBACK --------------------------------

    def _enqueue(self, topic, payload, boot, seq):
        self.outbox.put(topic, payload, boot, seq)
        self._queued.set()

    def _dropped(self):
        return self.outbox.stats["dropped"]

    def _on_ack(self, msg):
        if msg.token is not None:
            self.outbox.ack(msg.token)

    async def _drain(self):
        """Hand queued records to the MQTT session, oldest first, pipelined through its
        in-flight window; the session resends them across reconnects by itself."""
        ob = self.outbox
        c = self.client
        while True:
            await c.room()
            rec = ob.next()
            if rec is None:
                self._queued.clear()
                await self._queued.wait()
                continue
            ob.handed_over()
            # No await before publish() adds it to the session (room() made space).
            await c.publish(rec[0], rec[1], 1, False, wait=False, token=rec[2])

    async def _spill_loop(self):
        while True:
            await asyncio.sleep_ms(250)
            self.outbox.tick(self.client.is_connected())

    async def join_network(self):
        """Bring the link up before MQTT (Wi-Fi on boards), retrying with full jitter."""
        bo = Backoff(self.rnd, base=2, cap=60)
        while not await self.board.network_up(self.cfg["wifi"]):
            d = bo.next_delay()
            self.log("W", "no network reachable; retry in %.1f s" % d)
            await asyncio.sleep(d)

    async def run(self):
        """Boot, then run until stopped. A `reboot` command on the Unix port (whose board
        cannot reset) ends here and boots again in this process, as a board would."""
        while True:
            await self._run_boot()
            if not self._rebooting:
                return
            await self._restart.wait()
            self._rebooting = False
            self._reported_once = False
            self._restart.clear()

    async def _run_boot(self):
        cfg = await self.load_config()
        self.boot = bootlog.next_boot(self.board.fs)["boot"]
        self.build(cfg)
        n = self.outbox.recover()
        if n:
            self.log("I", "outbox: %d message(s) from before the reboot" % n)
        self.log("I", "boot %d, firmware %s, broker %s:%d" % (
            self.boot, FW_VERSION, cfg["broker"]["host"], cfg["broker"]["port"]))
        await self.join_network()
        self._tasks = [
            asyncio.create_task(self.client.run()),
            asyncio.create_task(self.telemetry.run()),
            asyncio.create_task(self._drain()),
            asyncio.create_task(self._spill_loop()),
            asyncio.create_task(
                self.sync.refresh_loop(lambda: self.sync.twin.effective()["refresh_interval"])
            ),
            asyncio.create_task(self.health.run()),
            asyncio.create_task(self.health.watch_lag()),
        ]
        try:
            await asyncio.gather(*self._tasks)
        except asyncio.CancelledError:
            if not self._rebooting:
                raise

    async def stop(self, loop_restarted=False):
        """Graceful stop: unacknowledged telemetry to flash, retained offline status, then
        DISCONNECT (no last will)."""
        if self.outbox:
            self.outbox.spill()
        if self.client:
            await self.client.disconnect(
                (self.topics.status, self._status("offline"), True), not loop_restarted
            )
        for t in self._tasks:
            t.cancel()


async def run_devices(devices):
    await asyncio.gather(*[d.run() for d in devices])


async def stop_devices(devices, loop_restarted=False):
    await asyncio.gather(*[d.stop(loop_restarted) for d in devices])
