# Runs the user's application for one device (README "Writing your application"): its
# setup, its sensors in the telemetry message, its events through the outbox, its commands,
# settings, retained state and supervised tasks. Every failure of the app's code is counted
# (health `app`) and none stops the device. Imported only by a device that has an app.
import asyncio
import json

from firmware import settings
from firmware.api import Dev
from firmware.version import SCHEMA

# Fields of the telemetry message that are the firmware's: no sensor may take them.
_RESERVED = ("v", "seq", "boot", "up", "ts", "dropped", "temp_c")
_KINDS = ("num", "int", "bool", "str", "choice")
# Outbox keys of events: their seq with the top bit set, never a telemetry (boot, seq).
_EVENT_KEY = 0x80000000
# The app's share of one telemetry message, so that the message fits an outbox record.
_SENSOR_BYTES = 640
_STATE_BYTES = 1024
_MAX = 16  # sensors, settings, commands, tasks, state entries: each at most this many
_ERR = 72  # characters kept of an error text


def _name_ok(name):
    if not isinstance(name, str) or not 1 <= len(name) <= 32:
        return False
    for c in name:
        if not ("a" <= c <= "z" or "0" <= c <= "9" or c == "_" or c == "-"):
            return False
    return True


def _check_name(what, name, taken):
    if not _name_ok(name):
        raise ValueError("%s name %r: 1 to 32 of a-z 0-9 _ -" % (what, name))
    if name in taken:
        raise ValueError("%s %r is declared twice" % (what, name))
    if len(taken) >= _MAX:
        raise ValueError("more than %d %ss" % (_MAX, what))


def _bad_scalar(v):
    t = type(v)
    if t is bool or t is int:
        return None
    if t is float:
        return None if v == v and v - v == 0 else "not a finite number"  # nan, inf
    if t is str:
        return None if len(v) <= 64 else "a string longer than 64"
    return "a %s, not a number, string or bool" % t.__name__


def _bad_value(v):
    """Why a sensor's value cannot go into telemetry, or None."""
    if type(v) is dict:
        if len(v) > 8:
            return "a dict of more than 8 entries"
        for k in v:
            if not _name_ok(k):
                return "dict key %r" % (k,)
            why = _bad_scalar(v[k])
            if why:
                return "%s: %s" % (k, why)
        return None
    return _bad_scalar(v)


def _hardware(board):
    """The board with the hardware calls an app makes (i2c, pin): board modules' own
    wrappers, the Unix port's simulated. Only a device with an app loads one."""
    name = "unixhw" if board.name == "unix" else "mcuhw"
    return __import__("firmware.boards." + name, None, None, ["Hardware"]).Hardware(board)


def _err(e):
    return repr(e)[:_ERR]


class _Sensor:
    def __init__(self, name, read, every, timeout_ms):
        self.name = name
        self.read = read
        self.every = every
        self.timeout_ms = timeout_ms
        self.reads = 0
        self.errors = 0
        self.timeouts = 0
        self.last_error = None
        self.value = None
        self.size = 0  # bytes the value takes in the message
        self.ok = False  # the last read gave a value


class AppHost:
    def __init__(self, device, module, error=None):
        self.device = device
        self.module = module
        self.error = error  # why the app is not running, or None
        self.loaded = False
        self._building = False
        self.hardware = _hardware(device.board)  # dev.board: the board with I2C and pins
        self._forget()
        self.seq = 0  # QoS 1 events of this boot
        self.stats = {"events": 0, "event_drops": 0, "q0_drops": 0, "cmd_handled": 0,
                      "cmd_errors": 0, "setting_errors": 0, "refused": 0}
        self._dirty = asyncio.Event()

    def _forget(self):
        self.sensors = []
        self.decl = []  # settings.find tuples of the app.* settings
        self.values = {}  # setting name (without app.) -> effective value
        self._on_change = {}
        self.commands = {}
        self.tasks = []
        self.state = {}

    # ---- setup: what app.setup(dev) may declare ----------------------------------------

    def setup(self, builtins):
        """Call app.setup(dev); `builtins`: command names the app may not take. A setup
        that raises leaves the device running without the app, saying why."""
        if self.module is None:
            return False
        self._builtins = builtins
        self._building = True
        try:
            self.module.setup(Dev(self))
            self.loaded = True
        except Exception as e:
            self.error = "setup: " + _err(e)
            self._forget()
            self.device.log("E", "app not started: %s" % self.error)
        self._building = False
        return self.loaded

    def _in_setup(self, what):
        if not self._building:
            raise ValueError("dev.%s is for app.setup(dev) only" % what)

    def _timeout(self, ms):
        # A quarter of the watchdog timeout: a read that takes longer is abandoned long
        # before the supervisor would stop feeding.
        return ms if ms else max(100, self.device.cfg["watchdog_ms"] // 4)

    def add_sensor(self, name, read, every, timeout_ms):
        self._in_setup("sensor")
        _check_name("sensor", name, [s.name for s in self.sensors])
        if name in _RESERVED:
            raise ValueError("sensor %r: a field of every telemetry message" % name)
        if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float))
                                  or not 0.1 <= every <= 86400):
            raise ValueError("sensor %r: every must be 0.1..86400 s" % name)
        self.sensors.append(_Sensor(name, read, every, self._timeout(timeout_ms)))

    def add_command(self, name, handler):
        self._in_setup("command")
        if name == "ping" or name in self._builtins:
            raise ValueError("command %r is built in: choose another name" % (name,))
        _check_name("command", name, self.commands)
        self.commands[name] = handler

    def add_setting(self, name, kind, default, low, high, choices, on_change):
        self._in_setup("setting")
        _check_name("setting", name, self.values)
        if kind not in _KINDS:
            raise ValueError("setting %r: kind must be one of %s" % (name, "|".join(_KINDS)))
        lo, hi = low, high
        if kind == "choice":
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ValueError("setting %r: a choice needs choices" % name)
            lo = tuple(choices)
        elif kind == "str":
            hi = 64 if high is None else high
        for x in (lo, hi) if kind in ("num", "int") else ():
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
                raise ValueError("setting %r: low and high must be numbers" % name)
        d = ("app." + name, kind, default, lo, hi, True)
        settings.check(d[0], default, (d,))  # a default outside its own limits: the app's bug
        self.decl.append(d)
        self.values[name] = default
        self._on_change[name] = on_change

    def add_task(self, coro_fn, name):
        self._in_setup("task")
        _check_name("task", name, [t[0] for t in self.tasks])
        self.tasks.append((name, coro_fn))

    # ---- settings ----------------------------------------------------------------------

    def get(self, name):
        return self.values[name]

    def apply(self, changed, eff, boot=False):
        """New effective values of app.* settings; each on_change called (also at boot for
        a cached value that is not the default)."""
        for k in changed:
            if not k.startswith("app."):
                continue
            n = k[4:]
            if n not in self.values or (boot and eff[k] == self.values[n]):
                continue
            self.values[n] = eff[k]
            fn = self._on_change.get(n)
            if fn is None:
                continue
            try:
                r = fn(eff[k])
                if hasattr(r, "send"):
                    self.device._fire(r, "app setting %s" % n)
            except Exception as e:
                self.stats["setting_errors"] += 1
                self.device.log("E", "app: on_change of %s raised %s" % (n, _err(e)))

    # ---- sensors -----------------------------------------------------------------------

    async def _read(self, s):
        s.ok = False
        try:
            v = s.read()
            if hasattr(v, "send"):  # an async read: abandoned after its time
                v = await asyncio.wait_for_ms(v, s.timeout_ms)
            why = _bad_value(v)
            if why:
                raise TypeError("returned " + why)
        except asyncio.TimeoutError:
            s.timeouts += 1
            self._sensor_failed(s, "no value within %d ms" % s.timeout_ms)
            return
        except Exception as e:
            s.errors += 1
            self._sensor_failed(s, _err(e))
            return
        s.reads += 1
        s.value = v
        s.size = len(json.dumps(v)) + len(s.name) + 4
        s.ok = True

    def _sensor_failed(self, s, why):
        if why != s.last_error:  # logged when it changes, not at every sample
            self.device.log("W", "app sensor %s: %s" % (s.name, why))
        s.last_error = why

    async def read_into(self, out, beat):
        """Add the sensors' values to a telemetry message's readings; `beat(ms)` is the
        telemetry task's check-in before each read that may wait."""
        room = _SENSOR_BYTES
        for s in self.sensors:
            if s.every is None:
                beat(s.timeout_ms)
                await self._read(s)
            if not s.ok:
                continue
            if s.size > room:
                s.errors += 1
                self._sensor_failed(s, "left out: the message is full")
                continue
            room -= s.size
            out[s.name] = s.value

    async def _sample(self, s):
        sup = self.device.sup
        name = "sensor:" + s.name
        while True:
            sup.beat(name, s.timeout_ms)
            await self._read(s)
            sup.beat(name, int(s.every * 1000))
            await asyncio.sleep(s.every)

    # ---- events ------------------------------------------------------------------------

    def event(self, name, data, qos):
        d = self.device
        if not _name_ok(name) or qos not in (0, 1):
            return self._refuse("event %r at QoS %r: a name of a-z 0-9 _ - and QoS 0 or 1"
                                % (name, qos))
        doc = {"v": SCHEMA, "boot": d.boot, "up": d.board.uptime_ms(), "data": data}
        ts = d.board.unix_time()
        if ts is not None:
            doc["ts"] = ts
        topic = "%sevent/%s" % (d.topics.base, name)
        d.client.alias(topic)  # the first few event names travel as two-byte aliases (5)
        if qos == 0:
            # Only while connected: dropped and counted otherwise (no seq: gaps are normal).
            if not d.client.is_connected():
                self.stats["q0_drops"] += 1
                return False
            try:
                text = json.dumps(doc)
            except (TypeError, ValueError) as e:
                return self._refuse("event %s: %s" % (name, _err(e)))
            d._fire(d.client.publish(topic, text, 0), "app event")
            self.stats["events"] += 1
            return True
        if d.outbox is None:
            self.stats["event_drops"] += 1
            return False
        doc["seq"] = self.seq + 1
        dropped = d.outbox.stats["dropped"]
        if dropped:
            doc["dropped"] = dropped  # as in telemetry: explains a gap in seq
        try:
            text = json.dumps(doc)
        except (TypeError, ValueError) as e:
            return self._refuse("event %s: %s" % (name, _err(e)))
        self.seq += 1
        self.stats["events"] += 1
        ok = d.outbox.put(topic, text, d.boot, _EVENT_KEY | self.seq)
        if not ok:
            self.stats["event_drops"] += 1  # the outbox counted and logged it too
        d._queued.set()
        return ok

    def _refuse(self, why):
        self.stats["refused"] += 1
        self.device.log("E", "app: " + why)
        return False

    # ---- commands ----------------------------------------------------------------------

    def handler(self, name):
        """The app's command `name` as firmware/commands.py runs handlers."""
        fn = self.commands[name]

        async def run(body):
            args = {}
            for k in body:
                if k != "id" and k != "exp":
                    args[k] = body[k]
            self.stats["cmd_handled"] += 1
            try:
                r = fn(args)
                if hasattr(r, "send"):
                    # On the MQTT read loop: one that takes long would stall the connection.
                    r = await asyncio.wait_for_ms(r, self._timeout(None))
                if r is None:
                    r = {}
                elif type(r) is not dict:
                    r = {"result": r}
                json.dumps(r)  # what JSON cannot carry fails here, not in the answer
                return r
            except asyncio.TimeoutError:
                self.stats["cmd_errors"] += 1
                raise ValueError("no answer within %d ms" % self._timeout(None))
            except Exception:
                self.stats["cmd_errors"] += 1
                raise
        return run

    # ---- state -------------------------------------------------------------------------

    def set_state(self, name, value):
        if not _name_ok(name):
            return self._refuse("state name %r: 1 to 32 of a-z 0-9 _ -" % (name,))
        if value is None:
            self.state.pop(name, None)
        else:
            old = self.state.get(name)
            self.state[name] = value
            try:
                n = len(json.dumps(self.state))
            except (TypeError, ValueError) as e:
                n = _STATE_BYTES + 1
                why = _err(e)
            else:
                why = "the state document would be %d bytes (at most %d)" % (n, _STATE_BYTES)
            if n > _STATE_BYTES or len(self.state) > _MAX:
                if old is None:
                    self.state.pop(name)
                else:
                    self.state[name] = old
                return self._refuse("state %s: %s" % (name, why))
        self._dirty.set()
        return True

    def state_doc(self):
        d = self.device
        doc = {"v": SCHEMA, "boot": d.boot, "state": self.state}
        ts = d.board.unix_time()
        if ts is not None:
            doc["ts"] = ts
        return json.dumps(doc)

    async def publish_state(self):
        """Retained, so an operator sees the current state at once; while offline nothing
        (the next connect publishes it)."""
        c = self.device.client
        if self.loaded and c.is_connected():
            await c.publish(self.device.topics.base + "state", self.state_doc(), 1, True,
                            wait=False)

    async def _state_loop(self):
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await asyncio.sleep_ms(50)  # a burst of changes goes out as one document
            await self.publish_state()

    # ---- running -----------------------------------------------------------------------

    def spawn(self, sup):
        if not self.loaded:
            return
        for name, fn in self.tasks:
            sup.spawn("app:" + name, fn, critical=False)
        for s in self.sensors:
            if s.every is not None:
                sup.spawn("sensor:" + s.name, lambda s=s: self._sample(s), critical=False,
                          within_ms=s.timeout_ms)
        sup.spawn("app-state", self._state_loop, critical=False)

    def beat(self, ms):
        sup = self.device.sup
        cur = asyncio.current_task()
        for name, t in sup.tasks.items():
            if t.task is cur:
                sup.beat(name, ms)
                return

    def health(self):
        h = {"loaded": self.loaded, "error": self.error,
             "sensors": {s.name: {"reads": s.reads, "errors": s.errors,
                                  "timeouts": s.timeouts, "last_error": s.last_error}
                         for s in self.sensors},
             "commands": {"handled": self.stats["cmd_handled"],
                          "errors": self.stats["cmd_errors"]},
             "events": {"queued": self.stats["events"], "dropped": self.stats["event_drops"],
                        "dropped_q0": self.stats["q0_drops"]},
             "refused": self.stats["refused"],
             "setting_errors": self.stats["setting_errors"]}
        return h

    def trial(self):
        """(what a new version's app has not shown yet, why it must give up at once or
        None): an update whose app does not start, or whose every sensor only fails, is
        rolled back."""
        if self.error:
            return [], "the app did not start: " + self.error
        if self.sensors and not [s for s in self.sensors if s.reads]:
            if not [s for s in self.sensors if s.errors + s.timeouts < 3]:
                return [], "every app sensor failed 3 times"
            return ["an app sensor reading"], None
        return [], None
