# The device: built from a board object, no module-level state, so one process can run many.
# Boot order: watchdog feeding, bootstrap config from flash (retried, never a crash loop),
# boot history (reset cause, safe mode), then the supervised tasks on one asyncio loop.
import asyncio
import json
import sys

from backoff import Backoff, Fixed, Rng
from mqtt.client import MQTTClient
from outbox.outbox import Outbox
from firmware import forget, protocols, settings
from firmware.bootlog import BootLog
from firmware.commands import Commands
from firmware.configsync import ConfigSync
from firmware.health import Health, LogRing
from firmware.supervisor import Supervisor
from firmware.telemetry import Telemetry
from firmware.topics import Topics
from firmware.version import FW_VERSION, SCHEMA
from firmware.wifi import LinkSupervisor

CONFIG_RETRY_S = 5
BOOT_WDT_MS = 8000  # until the config says otherwise
_LEVELS = "DIWE"  # debug, info, warn, error: log lines carry the letter
_BIRTH = "birth"  # the birth message's token: its PUBACK is noted, not the outbox's


def _forget_loader():
    """Drop the loader's module (otaboot), as main.py does, unless a trial's deadline lives
    in it until the new version confirms itself."""
    ob = sys.modules.get("otaboot")
    if ob is not None and not ob.deadline_armed():
        forget("otaboot")


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
        self.bootlog = BootLog(board.fs)
        self.bootrec = {}
        self.safe = False
        self.sup = None
        self.link = None
        self.timesync = None
        self.sync = None
        self.health = None
        self.ota = None  # firmware/ota.py's Updater, while a board judges or runs an update
        self._ota_text = None  # its last state, as published
        self.failover = None  # firmware/failover.py's, with more than one broker
        self.app = None  # firmware/apphost.py's AppHost, on a board with an application
        self._birth_acked = False
        self.logring = LogRing()
        self._min_level = 1  # index in _LEVELS: info
        self._reported_once = False
        self._rebooting = False
        self._restart = asyncio.Event()
        self._reboot_task = None
        self.sleep_state = None  # firmware/duty.py's SleepState, on a board that wakes
        self.duty = None  # firmware/duty.py's DutyCycle, during a duty-cycled wake
        # A list holding room taken early in the boot (main.py), released for our buffers.
        self.heap_reserve = None

    def log(self, level, msg):
        if _LEVELS.find(level) >= self._min_level:
            line = "%s %s %s" % (self.name, level, msg)
            self.logring.add(line)
            self.board.log(line)

    async def load_config(self):
        """Bootstrap config, waiting for a valid one: a missing or bad file is logged once
        (and again only if the error changes), then re-read every config_retry_s."""
        from firmware import bootconfig  # boot-only code: dropped again below

        last = None
        while True:
            try:
                cfg = bootconfig.load(self.board.fs)
                self._tls_contexts(cfg["broker"]["endpoints"])
                # 8 KB of bytecode (64-bit port) that the rest of the boot has no use for.
                forget("firmware.bootconfig")
                forget("firmware.tlsctx")
                _forget_loader()  # bootconfig imported it for one check: 1.2 KB held
                return cfg
            except ValueError as e:  # bootconfig.ConfigError
                if str(e) != last:
                    last = str(e)
                    self.log("E", "bootstrap config: %s; retrying every %d s" % (e, self.config_retry_s))
            await asyncio.sleep(self.config_retry_s)

    def _tls_contexts(self, endpoints):
        """An SSL context per distinct set of TLS files of the brokers (usually one for
        all: each holds its parsed CA and key in the heap), put in each endpoint with its
        server_hostname, as the MQTT client takes them."""
        made = []
        for e in endpoints:
            tls = e.get("tls")
            if not tls:
                continue
            files = (tls["ca"], tls["cert"], tls["key"])
            for f, ctx in made:
                if f == files:
                    break
            else:
                from firmware import tlsctx  # ssl costs heap; only devices using TLS pay

                ctx = tlsctx.context(self.board.fs, tls)
                made.append((files, ctx))
            e["ssl"] = ctx
            e["server_hostname"] = tls["server_hostname"]
            if self.ssl is None:
                self.ssl = ctx  # the first broker's: what an update's server is checked by

    def _status(self, state, outage=None, extra=None):
        d = {"v": SCHEMA, "state": state, "boot": self.boot, "fw": FW_VERSION,
             "cause": self.bootrec.get("cause"), "prev_up_s": self.bootrec.get("prev_up_s")}
        if extra:
            d.update(extra)
        if self.safe:
            d["safe_mode"] = True
        if self.cfg and self.cfg["profile"] == "baseline":
            d["profile"] = "baseline"
        c = self.client
        if c and len(c.endpoints) > 1:
            d["broker"] = c.endpoint_name()
            d["endpoint"] = c.ep
            # Each broker keeps its own retained status: the newest one is current.
            ts = self.board.unix_time()
            if ts is not None:
                d["ts"] = ts
        if outage:
            # Refusals and flaps since the previous connection, reported now that we can.
            d["outage"] = outage
        if self.app:
            d["app"] = {"loaded": self.app.loaded}
            if self.app.error:
                d["app"]["error"] = self.app.error
        return json.dumps(d)

    def build(self, cfg):
        """Wire the tasks for a validated config: reads the config cache from flash, starts
        nothing, touches no network."""
        # The buffers allocated here live as long as the boot: collect the boot's garbage
        # first, so they land in one compact stretch instead of between scattered leftovers.
        self.board.collect()
        self.cfg = cfg
        self.name = cfg["device_id"]
        self.topics = Topics(cfg["prefix"], cfg["device_id"])
        b = cfg["broker"]
        r = b["reconnect"]
        o = cfg["outbox"]
        # Baseline (comparison runs only): fixed 2 s retries and a clean session, so every
        # connect resubscribes and thereby asks for the retained config again.
        base_p = cfg["profile"] == "baseline"
        self.commands = Commands(
            self.topics, self._publish_q1, self.board.uptime_ms,
            {"refresh-config": self._cmd_refresh, "report": self._cmd_report,
             "reboot": self._cmd_reboot, "logs": self._cmd_logs},
            fs=self.board.fs, now=self.board.unix_time, log=self.log,
        )
        # The user's application declares its settings, sensors and commands before the
        # twin is built; in safe mode it does not run (it may be what crashed).
        self.app = None if self.safe else self._load_app()
        self.link = LinkSupervisor(
            self.board.link, cfg["wifi"],
            Backoff(self.rnd, r["base"], r["cap"], r["first_window"], r["stable_s"],
                    flap_limit=1000),
            self.log, self._uptime, beat=lambda ms: self._beat("link", ms),
        )
        eps = b["endpoints"]  # bootconfig's, with the SSL contexts (_tls_contexts)
        protocols.load(self.board.fs, eps)
        if base_p:
            for e in eps:
                e["protocol"] = "3.1.1"  # the blocking client it imitates speaks 3.1.1
        self.client = MQTTClient(
            cfg["device_id"],
            b["host"],
            b["port"],
            keepalive=b["keepalive"],
            clean=base_p,
            will=(self.topics.status, json.dumps({"v": SCHEMA, "state": "offline"}), 1, True),
            endpoints=eps,
            tls_room=self.board.tls_room,
            resolve=self.board.resolve,
            window=b["window"],
            max_frame=b["max_frame"],
            timeout=b["timeout"],
            backoff=Fixed(2.0) if base_p else Backoff(self.rnd, **r),
            ticks_ms=self.board.ticks_ms,
            ticks_diff=self.board.ticks_diff,
            uptime_s=self._uptime,
            log=self.log,
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_ack=self._on_ack,
            link=self.link.up,
            beat=lambda ms: self._beat("mqtt", ms),
            session_expiry=0 if base_p else b["session_expiry_s"],
            will_delay=0 if base_p else b["will_delay_s"],
            on_protocol=protocols.saver(self.board.fs, eps, self.log),
        )
        self.client.alias(self.topics.telemetry)
        self.client.had_session = self.boot > 1
        self.link.on_down = self.client.link_lost
        if len(eps) > 1:
            from firmware.failover import Failover  # a device with one broker does not pay

            self.failover = Failover(
                cfg["failover"], self.rnd, self._uptime, self.log, base_p,
                lambda: (self.topics.status, self._status("offline"), True))
            self.failover.client = self.client
            self.client.failover = self.failover
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
        for k, v in cfg["power"].items():
            base["power." + k] = v
        # The refresh renews the command subscription too: a broker that claims a session
        # it does not have (session-present 1) would otherwise keep commands from us.
        self.sync = ConfigSync(self.board.fs, self.topics, cfg["groups"], self.client,
                               self.rnd, self.log, self._apply, base,
                               renew=(self.topics.cmd_filter,),
                               extra=self.app.decl if self.app else ())
        self.sync.subscribe()
        eff = self.sync.load()  # the cached config, from the first moment of the boot
        # The outbox ring is the one large block: into the room reserved for it at start-up
        # (main.py), released only now so that the garbage of loading the cached config
        # does not land in it first.
        if self.heap_reserve:
            self.heap_reserve.clear()
            self.board.collect()
        self.outbox = Outbox(
            self.board.fs if eff["outbox.flash_bytes"] else None,
            ram_bytes=eff["outbox.ram_bytes"], flash_bytes=eff["outbox.flash_bytes"],
            policy=eff["outbox.policy"], overflow=o["overflow"], spill_ms=o["spill_ms"],
            ticks_ms=self.board.ticks_ms, ticks_diff=self.board.ticks_diff, log=self.log,
            topic=self.topics.telemetry,
        )
        self._queued = asyncio.Event()
        self.telemetry = Telemetry(
            self.board, self.rnd, self._enqueue, self.topics.telemetry, self.boot,
            eff["telemetry_interval"], dropped=self._dropped,
            beat=lambda ms: self._beat("telemetry", ms),
            app=self.app if self.app and self.app.loaded else None,
        )
        self.health = Health(self, lambda: self.sync.twin.effective()["health_interval"],
                             self.rnd)
        if self.board.ota_root is not None:
            # Loaded at each boot for a trial to judge and the last outcome to report; let
            # go again once idle (_ota_task).
            self._ota_load()
        self._apply([s[0] for s in settings.SETTINGS if s[5]], eff)
        if self.app:
            # The cached values reach the app before its tasks start.
            self.app.apply([d[0] for d in self.app.decl], eff, boot=True)

    def _load_app(self):
        """The user's application (README "Writing your application"), or None: a board
        without one never loads the code that hosts it."""
        b = self.board
        if hasattr(b, "find_app") and not b.find_app():  # the Unix board's own rule
            return None
        # On a board, sys.path's order: an update slot's app/, /app on the flash, frozen.
        mod = err = None
        try:
            import app as mod
        except ImportError as e:
            if not e.args or e.args[0] != "no module named 'app'":
                err = "import: %r" % (e,)
        except Exception as e:
            err = "import: %r" % (e,)
        if err:  # the app's own import failed: the device goes on without it
            self.log("E", "app not started: " + err)
        elif mod is None:
            return None
        from firmware.apphost import AppHost

        host = AppHost(self, mod, err)
        if host.setup(list(self.commands.handlers)):
            for n in host.commands:
                self.commands.handlers[n] = host.handler(n)
                self.commands.durable += (n,)
        return host

    def _apply(self, changed, eff):
        """Put new effective settings to work; returns those that wait for a reboot."""
        if self.telemetry:
            self.telemetry.interval = eff["telemetry_interval"]
        for bo in (self.client.backoff, self.link.backoff):
            bo.base = eff["reconnect.base"]
            bo.cap = eff["reconnect.cap"]
            bo.first_window = eff["reconnect.first_window"]
        self._min_level = "diwe".find(eff["log_level"][0])
        if self.app:
            self.app.apply(changed, eff)
        if "ota" in changed:
            if self.ota:
                self.ota.request(eff["ota"])
            elif eff["ota"] and self.board.ota_root is not None:
                if not self.safe:  # in safe mode only a trial is judged, nothing fetched
                    self._ota_load()
                    self.ota.request(eff["ota"])
                    self.sup.spawn("ota", self._ota_task, critical=False)
            elif eff["ota"]:
                self.log("W", "update requested, but this board cannot be updated (its "
                              "flash is not mounted: several boards share the process)")
        return [k for k in changed if not settings.find(k, self.sync.twin.extra)[5]]

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
        self._reboot_task = asyncio.create_task(self._reset("on command", "soft", 0.5))
        return {"rebooting": True}

    async def _fatal(self, reason):
        # Its own task: the reset cancels every supervised task, the caller among them.
        self._reboot_task = asyncio.create_task(self._reset(reason, "crash"))

    async def _reset(self, why, cause, delay=0):
        """Reset the board; `cause` is what the next boot reports. A soft reset is a
        graceful stop first; a crash is abrupt (the broker publishes the last will), but
        the queue still goes to flash."""
        await asyncio.sleep(delay)
        if cause == "soft":
            self.log("W", "rebooting " + why)
        else:
            self.log("E", "resetting: " + why)
        self._rebooting = True
        if cause == "soft":
            await self.stop()
        else:
            self._spill()
            await self.client.abort()
            self.sup.cancel_all()
        # A soft reset's stop has marked the boot stable; a crash leaves it short.
        self._save_uptime(pending=cause)
        self.board.reset()  # a board never comes back from this; the Unix port does
        self._restart.set()

    def _uptime(self):
        """Seconds since boot, wrap-free: for connection lengths."""
        return self.board.uptime_ms() / 1000

    def _beat(self, name, ms):
        if self.sup is not None:
            self.sup.beat(name, ms)

    def _save_uptime(self, stable=None, pending=None):
        if not self.bootlog.rec:
            return
        try:
            self.bootlog.save(self.board.uptime_s(), stable, pending)
        except OSError as e:
            self.log("E", "boot record not saved: %r" % (e,))

    def _spill(self):
        if self.duty is not None:
            self.duty.spill()  # kept readings stay in the sleep memory, not on flash as well
            return
        if self.outbox and not self.safe:
            try:
                self.outbox.spill()
            except Exception as e:
                self.log("E", "outbox spill at stop failed: %r" % (e,))

    async def _boot_health(self):
        """Mark the boot stable once it outlived the crash-loop threshold (or, in safe mode,
        the healthy period: then reboot into normal mode), and keep the uptime on flash so
        the next boot can report it (a few writes per day)."""
        sm = self.cfg["safe_mode"]
        step = sm["healthy_s"] if self.safe else sm["short_boot_s"]
        await asyncio.sleep(step)
        if self.safe:
            # Its own task: the reset cancels every supervised task, this one among them.
            self._reboot_task = asyncio.create_task(
                self._reset("out of safe mode: healthy for %d s" % step, "soft"))
            return
        self._save_uptime(stable=True)
        while True:
            step = min(step * 2, 3600)
            await asyncio.sleep(step)
            self._save_uptime()

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
        # Birth message: retained, so a late subscriber sees the device online at once. Its
        # PUBACK is one of the signs a new version waits for before it confirms itself. A
        # duty-cycled wake says `sleeping` instead, once it knows when it wakes next.
        if self.duty is None:
            self._fire(
                self.client.publish(
                    self.topics.status, self._status("online", self.client.outage), 1, True,
                    wait=False, token=_BIRTH
                ), "birth message"
            )
        if self._ota_text and (self.duty is None or self.ota is not None
                               or self.bootrec["cause"] != "deepsleep"):
            # A wake sends it only while an update is under way, or once per boot: it is
            # retained, and between updates it does not change.
            self._fire(self._publish_ota(self._ota_text), "ota state")
        if self.app and self.app.state:
            # Retained, but a broker may have lost it (restarted without persistence).
            self._fire(self.app.publish_state(), "app state")
        if not self._reported_once:
            # Once per boot (a new boot's ConfigSync has sent nothing yet); after that
            # config/reported goes out only when it changes. Not forced: a retained layer
            # arriving at this connect may already have sent this very document.
            self._reported_once = True
            self._fire(self.sync.report(), "config report")

    def _fire(self, coro, what):
        if self.sup is not None:
            self.sup.fire(coro, what)
        else:
            asyncio.create_task(coro)

    async def _publish_q1(self, topic, payload):
        await self.client.publish(topic, payload, 1, False, wait=False)

    # ---- outbox: telemetry waits there for its PUBACK --------------------------------

    def _enqueue(self, topic, payload, boot, seq):
        self.outbox.put(topic, payload, boot, seq)
        self._queued.set()

    def _dropped(self):
        return self.outbox.stats["dropped"]

    def _on_ack(self, msg):
        # msg.failed: released undelivered (larger than the broker takes), counted in
        # health's mqtt.too_big; the outbox lets it go rather than offer it forever.
        if msg.token == _BIRTH:
            self._birth_acked = True
        elif msg.token is not None:
            self.outbox.ack(msg.token)
        if self.duty is not None:
            if msg.token is not None and msg.token != _BIRTH:
                self.duty.on_ack(msg.token)
            self.duty.acked.set()

    # ---- over-the-air updates: what firmware/ota.py needs of the device ----------------

    def _ota_load(self):
        from firmware.ota import Updater  # a board that cannot be updated does not pay

        self.ota = Updater(self.board.fs, self.cfg["ota"], self.ssl, self.rnd, self.log,
                           self._publish_ota, self._ota_reset, self._ota_checks,
                           self._uptime)
        self.ota.start()

    async def _ota_task(self):
        await self.ota.run()
        self._ota_drop()

    def _ota_drop(self):
        # Idle (nothing requested, or nothing to act on): about 5 KB of code, state and
        # buffer that a board needs only during an update or a trial. Its last state stays
        # here as text, sent again at each connect.
        self.ota = None
        for m in ("firmware.ota", "firmware.otahttp", "firmware.otacheck"):
            forget(m)
        _forget_loader()

    async def _publish_ota(self, text):
        # Never waits for a connection (a version on trial that cannot connect must still
        # roll back): the state goes out again at every connect (_on_connect).
        self._ota_text = text
        if self.client.is_connected():
            await self.client.publish(self.topics.ota, text, 1, True, wait=False)

    async def _ota_reset(self, why):
        # Its own task: the reset cancels every supervised task, the caller among them.
        self._reboot_task = asyncio.create_task(self._reset(why, "soft"))
        await asyncio.sleep(60)

    def _ota_checks(self):
        """(what a new version has not shown yet, why it must give up at once or None)."""
        unmet = []
        if not self.client.is_connected():
            unmet.append("broker connection")
        if not self._birth_acked:
            unmet.append("birth message acknowledged")
        if not self.outbox.stats["acked"]:
            unmet.append("telemetry acknowledged")
        if not self.sync.reported_once():
            unmet.append("config applied")
        n = self.sup.stats["restarts"]
        why = "tasks died %d times: %r" % (n, self.sup.restarts()) if n >= 3 else None
        if self.app:
            more, app_why = self.app.trial()
            unmet += more
            why = why or app_why
        return unmet, why

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
            self._beat("spill", 250)
            await asyncio.sleep_ms(250)
            self.outbox.tick(self.client.is_connected())

    async def run(self):
        """Boot, then run until stopped. A `reboot` command on the Unix port (whose board
        cannot reset) ends here and boots again in this process, as a board would; so
        does a deep sleep of a board sharing its process, after the sleep."""
        while True:
            await self._run_boot()
            if not self._rebooting:
                return
            await self._restart.wait()
            ms = getattr(self.board, "slept_ms", None)
            if ms is not None:
                await asyncio.sleep_ms(ms)
                self.board.slept_ms = None
                self.board.start_uptime()
            self._rebooting = False
            self._reported_once = False
            self._birth_acked = False
            self._restart.clear()

    async def _run_boot(self):
        board = self.board
        # Fed from the first moment: waiting for a config is not a hang.
        self.sup = sup = Supervisor(board, self.log, self.rnd, BOOT_WDT_MS, self._fatal)
        feeder = asyncio.create_task(sup.watchdog())
        try:
            cfg = await self.load_config()
            sup.set_timeout(cfg["watchdog_ms"])
            self._start_boot(cfg)
            self.build(cfg)
            self._log_boot(cfg)
            if not self.safe and self.sync.twin.effective()["power.mode"] == "duty":
                self._spawn_wake(cfg)
            else:
                self.leave_duty()
                self._spawn_tasks(cfg)
            await asyncio.gather(*[t.task for t in sup.tasks.values()])
        except asyncio.CancelledError:
            if not self._rebooting:
                raise
        finally:
            feeder.cancel()

    def _start_boot(self, cfg):
        sm = cfg["safe_mode"]
        self.duty = self.sleep_state = None
        cause = self.board.reset_cause()
        # An RP2040's deep sleep ends in a watchdog reset: its sleep state says whether
        # that one was a sleep's (firmware/duty.py SLEEPING).
        if cause == "deepsleep" or (cause == "watchdog" and self.board.sleep_memory is None):
            from firmware.duty import SLEEPING, load_state

            st = self.sleep_state = load_state(self.board)
            if st is not None and st.boot and (cause == "deepsleep" or st.flags & SLEEPING):
                # A wake, not a boot: the boot it belongs to is in the sleep state, and
                # the record on flash is neither counted nor written (no short boot, no
                # wear).
                self.bootrec = {"boot": st.boot, "cause": "deepsleep", "prev_up_s": None}
                self.boot = st.boot
                self.safe = False
                return
        try:
            rec = self.bootlog.start(self.board.reset_cause(), sm["boots"])
        except OSError as e:
            # A full or failing flash must not stop the boot; the number may then repeat.
            self.log("E", "boot record not written: %r" % (e,))
            rec = self.bootlog.rec or {"boot": self.boot + 1, "cause": "unknown"}
        self.bootrec = rec
        self.boot = rec["boot"]
        self.safe = rec.get("safe", False)

    def _log_boot(self, cfg):
        rec = self.bootrec
        sm = cfg["safe_mode"]
        self.log("I", "boot %d, firmware %s, broker %s, reset cause %s, previous uptime %s s"
                 % (self.boot, FW_VERSION, ", ".join(
                     [self.client.endpoint_name(i) for i in range(len(self.client.endpoints))]),
                    rec["cause"], rec.get("prev_up_s")))
        if cfg["profile"] == "baseline":
            self.log("W", "baseline profile: for comparison runs only, not for production")
        if self.safe:
            self.log("E", "safe mode: %d short boots in a row; network, MQTT, config and "
                          "commands only for %d s" % (rec["streak"], sm["healthy_s"]))

    def _spawn_wake(self, cfg):
        """A duty-cycled wake (firmware/duty.py), which ends in a deep sleep; none of the
        uptime schedules. The network comes only if the wake sends (wake_network)."""
        from firmware.duty import DutyCycle, SleepState

        st = self.sleep_state
        if st is None:
            st = self.sleep_state = SleepState(self.board.sleep_memory, self.board.fs)
            st.load()  # kept readings of a boot that ended in a reset
        else:
            self.client.had_session = True  # a wake of a boot that connected before
            self._adopt_boot_record()
        self.duty = DutyCycle(self, st)
        self.client.nodelay = True
        self.commands.handlers["stay-awake"] = self._cmd_stay_awake
        n = self.outbox.recover()
        if n:
            self.log("I", "outbox: %d message(s) on flash" % n)
        budget = int(self.sync.twin.effective()["power.awake_max_s"] * 1000)
        # The wake checks in for its whole budget: a hang anywhere in it (a sensor, a
        # connect) stops the feeding, and the watchdog resets the board into the next wake.
        self.sup.spawn("wake", self.duty.run, within_ms=budget + 2000)

    def wake_network(self):
        """The wake sends: the link, the MQTT session and the drain (and an update, and
        SNTP if the clock is not set). Not on a wake that only keeps its reading: the radio
        stays off."""
        sup = self.sup
        sup.spawn("link", self.link.run, within_ms=1000)
        sup.spawn("mqtt", self.client.run, within_ms=0)
        sup.spawn("drain", self._drain)
        if self.ota:
            # A trial to judge, or an update the cached config asks for: the updater says
            # which, and lets go at once when idle (the wake then does not stay for it).
            sup.spawn("ota", self._ota_task, critical=False)
        if self.board.ntp and self.board.unix_time() is None:
            self._spawn_ntp(self.cfg)  # the RTC keeps the time through deep sleep

    def _adopt_boot_record(self):
        """A wake's boot record is the one on flash (it was not started again): loaded, so
        that marking the boot stable and keeping its uptime work as in any boot."""
        from firmware import bootlog

        rec = bootlog.read(self.board.fs)
        if rec.get("boot") == self.boot:
            self.bootlog.rec = rec

    def _stranded_state(self):
        """A sleep state left by an earlier duty cycle (power.mode changed since), or None;
        firmware/duty.py is loaded only if there is one."""
        mem = self.board.sleep_memory
        try:
            if mem is not None:
                if not mem.read():
                    return None
            else:
                self.board.fs.stat("/sleep.bin")
        except OSError:
            return None
        from firmware.duty import load_state

        st = load_state(self.board)
        if st is None:
            forget("firmware.duty")
        return st

    def leave_duty(self):
        """power.mode is no longer duty and this boot began as a wake: it goes on as the
        same boot (the readings' seq continues, the kept ones go to the outbox)."""
        st = self.sleep_state
        if st is None:
            st = self._stranded_state()
            if st is None:
                return
        if st.boot == self.boot:
            self.telemetry.seq = st.seq
            if self.bootrec["cause"] == "deepsleep":
                self._adopt_boot_record()
        st.into(self.outbox, self.topics.telemetry)
        self.outbox.spill()  # on flash before the sleep memory lets go of them
        try:
            st.clear()  # no wake belongs to this boot any more
        except OSError as e:
            self.log("E", "sleep state not cleared: %r" % (e,))
        self.sleep_state = None
        forget("firmware.duty")

    async def _cmd_stay_awake(self, body):
        s = body.get("stay_awake_s", 600)
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 86400:
            raise ValueError("stay_awake_s must be a number of seconds in 0..86400")
        self.duty.stay_awake(s)
        return {"awake_s": s}

    def kick(self):
        """Records were put into the outbox directly: the drain looks again."""
        self._queued.set()

    def ota_requested(self):
        """An update is asked for and not yet done: a wake stays for it."""
        return bool(self.ota and self.ota.trial)

    async def deep_sleep(self, ms):
        """End this wake: every task stopped, then the board's deep sleep (a board does not
        come back from it; the Unix port's ends the process, or boots again in it). A reset
        already on its way (a reboot command, an update) goes first."""
        if self._reboot_task is not None and not self._reboot_task.done():
            await asyncio.sleep(60)  # cancelled by the reset
        self._rebooting = True
        self._reboot_task = asyncio.create_task(self._sleep_now(ms))
        await asyncio.sleep(60)  # cancelled by it

    async def _sleep_now(self, ms):
        self.log("I", "wake %d: awake %d ms; sleeping %.1f s" % (
            self.sleep_state.wakes if self.sleep_state else 0, self.board.uptime_ms(),
            ms / 1000))
        self.sup.cancel_all()
        self.board.deep_sleep(ms)
        self._restart.set()

    def _spawn_ntp(self, cfg):
        from firmware.ntp import TimeSync  # only boards without a set clock pay for it

        n = cfg["ntp"]
        self.timesync = TimeSync(
            self.board.set_time, self.rnd, self.log, self.board.ticks_ms, n["servers"],
            interval_s=n["interval"], timeout_ms=n["timeout_ms"],
            ticks_diff=self.board.ticks_diff,
            beat=lambda ms: self._beat("ntp", ms), now=self.board.unix_time)
        self.sup.spawn("ntp", self.timesync.run, critical=False,
                       within_ms=n["timeout_ms"] + 5000)

    def _spawn_tasks(self, cfg):
        sup = self.sup
        c = self.client
        sup.spawn("link", self.link.run, within_ms=1000)
        sup.spawn("mqtt", c.run, within_ms=0)  # run() checks in with its own bounds at once
        sup.spawn("refresh", lambda: self.sync.refresh_loop(
            lambda: self.sync.twin.effective()["refresh_interval"]), critical=False)
        sup.spawn("boot-health", self._boot_health, critical=False)
        if self.failover:
            sup.spawn("failover", self.failover.run, critical=False)
        if self.ota and (self.ota.trial or not self.safe):
            # In safe mode only a version on trial is judged (it cannot confirm: it rolls back).
            sup.spawn("ota", self._ota_task, critical=False)
        elif self.ota:
            self._ota_text = json.dumps(self.ota.state)  # still reported at each connect
            self._ota_drop()
        if self.board.ntp:
            self._spawn_ntp(cfg)
        if self.safe:
            return  # nothing that may have caused the crash loop
        n = self.outbox.recover()
        if n:
            self.log("I", "outbox: %d message(s) from before the reboot" % n)
        sup.spawn("telemetry", self.telemetry.run, within_ms=0)
        sup.spawn("drain", self._drain)
        sup.spawn("spill", self._spill_loop, within_ms=1000)
        sup.spawn("health", self.health.run, critical=False)
        sup.spawn("lag", self.health.watch_lag, critical=False)
        if self.app:
            self.app.spawn(sup)

    async def stop(self, loop_restarted=False):
        """Graceful stop: unacknowledged telemetry to flash, retained offline status, then
        DISCONNECT (no last will)."""
        self._spill()
        if self.client:
            await self.client.disconnect(
                (self.topics.status, self._status("offline"), True), not loop_restarted
            )
        # Not a crash: a boot that ends in a graceful stop does not count towards safe mode.
        self._save_uptime(stable=True)
        if self.sup:
            self.sup.cancel_all()

    def crashed(self, e):
        """The loop itself died (a bug outside any supervised task): record it, so the next
        boot reports a crash and counts towards safe mode, then reset."""
        self.log("E", "firmware crashed: %r" % (e,))
        self._spill()
        self._save_uptime(pending="crash")
        self.board.reset()


async def run_devices(devices):
    def unhandled(loop, ctx):
        # A task nobody awaits failed. One device per board: it is that device's; many in
        # one process (Unix simulation): it cannot be told whose, so it is only logged.
        e = ctx.get("exception")
        if len(devices) == 1 and devices[0].sup:
            devices[0].sup.unhandled("a task", e)
        else:
            print("E unhandled error in a task: %r" % (e,))

    asyncio.get_event_loop().set_exception_handler(unhandled)
    await asyncio.gather(*[d.run() for d in devices])


async def stop_devices(devices, loop_restarted=False):
    await asyncio.gather(*[d.stop(loop_restarted) for d in devices])
