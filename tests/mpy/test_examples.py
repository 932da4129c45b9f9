# The example applications (examples/env_sensor, examples/relay, the checkout's app/) driven
# through a recording stand-in for firmware/api.py's Dev, on the Unix board's simulated
# hardware (firmware/boards/unixhw.py): the SHT3x driver against the simulated sensor, the
# threshold's hysteresis, the relay's command and safety timer; and the boards' i2c()/pin().
#
# An example is imported as the package `app`, as a device holds it: MicroPython's os has no
# symlink, so its files are copied into a new directory's app/, put first on sys.path (ahead
# of the checkout's own app/), and `app`, `app.*` and that entry are dropped again after.
import asyncio
import errno
import os
import sys

import firmware.boards
from firmware.boards.unix import Board, Control
from firmware.boards.unixhw import SHT3X_ADDR, FakeI2C, Hardware, crc8
from mpyutil import CREATED, fresh_image, raises, with_fake_modules

_ROOT = __file__.rsplit("/", 3)[0] if __file__.count("/") >= 3 else "."
_APP_DIRS = []


def _tag():
    return "".join("%02x" % b for b in os.urandom(4))


def forget_app():
    for name in list(sys.modules):
        if name == "app" or name.startswith("app."):
            del sys.modules[name]
    while _APP_DIRS:
        sys.path.remove(_APP_DIRS.pop())


def load_app(example):
    """examples/`example` (None: the checkout's app/) imported as the package `app`."""
    forget_app()
    if example is not None:
        src = _ROOT + "/examples/" + example
        top = "/tmp/mpytest-app-" + _tag()
        for d in (top, top + "/app"):
            os.mkdir(d)
            CREATED.append(d)
        for name in os.listdir(src):
            if name.endswith(".py"):
                with open(src + "/" + name, "rb") as f, open(top + "/app/" + name, "wb") as g:
                    g.write(f.read())
                CREATED.append(top + "/app/" + name)
        sys.path.insert(0, top)
        _APP_DIRS.append(top)
    else:
        # The checkout's root is on sys.path where the Unix port's runner runs the tests,
        # not where a board does (testbed/hil.py mounts it elsewhere).
        sys.path.insert(0, _ROOT)
        _APP_DIRS.append(_ROOT)
    app = __import__("app")
    want = _ROOT + "/app/" if example is None else "/tmp/mpytest-app-"
    assert app.__file__.startswith(want), app.__file__  # not some other `app`
    return app


class FakeDev:
    """firmware/api.py's Dev as an app sees it, recording every call."""

    def __init__(self, board):
        self.board = board
        self.settings = {}  # name -> (kind, default, low, high, choices)
        self.values = {}
        self.on_change = {}
        self.sensors = {}
        self.events = []  # (name, data)
        self.commands = {}
        self.states = []  # (name, value), in order
        self.tasks = {}
        self.beats = []
        self.logs = []

    def sensor(self, name, read, every=None):
        self.sensors[name] = read

    def event(self, name, data, qos=1):
        self.events.append((name, data))
        return True

    def command(self, name, handler):
        self.commands[name] = handler

    def setting(self, name, kind, default, low=None, high=None, choices=None, on_change=None):
        self.settings[name] = (kind, default, low, high, choices)
        self.values[name] = default
        self.on_change[name] = on_change

    def get(self, name):
        return self.values[name]

    def state(self, name, value):
        self.states.append((name, value))
        return True

    def task(self, coro_fn, name):
        self.tasks[name] = coro_fn

    def beat(self, ms):
        self.beats.append(ms)

    def log(self, level, msg):
        self.logs.append((level, msg))

    def change(self, name, value):
        """What the config twin does with an operator's new value. Limits are not checked
        here (the firmware's job): a test may go below them to keep its waits short."""
        self.values[name] = value
        if self.on_change[name] is not None:
            self.on_change[name](value)

    def named(self, what):
        return [d for n, d in self.events if n == what]


def _board(name):
    """A Unix board as an app sees it (dev.board): with its simulated bus and pins."""
    b = Board(fresh_image(name), 64 * 4096)
    b.control.path = "/tmp/mpytest-control-%s-%s" % (name, _tag())
    CREATED.append(b.control.path)
    _write(b.control, ())
    return Hardware(b)


def _write(control, words):
    with open(control.path, "w") as f:
        f.write(" ".join(words))


async def _until(cond, ms=3000, what="condition"):
    for _ in range(ms // 10):
        if cond():
            return
        await asyncio.sleep_ms(10)
    raise AssertionError("timed out waiting for " + what)


def _reads(c, words):
    c.has("")  # reads the file again when due
    return list(c.words) == list(words)


async def control(board_or_control, *words):
    """Write the control file and wait until the board has read it (it reads at most every
    100 ms)."""
    c = getattr(board_or_control, "control", board_or_control)
    _write(c, words)
    await _until(lambda: _reads(c, words), what="control %r" % (words,))


# ---- the SHT3x driver against the simulated sensor ----------------------------------------


def _sht3x():
    return load_app("env_sensor").sht3x


def test_crc8_matches_the_datasheet_example():
    # The datasheet's example: CRC(0xBEEF) = 0x92; also the all-zero word.
    sht = _sht3x()
    buf = bytearray(b"\xbe\xef\x00\x00")
    assert sht.crc8(buf, 0) == 0x92 and crc8(buf, 0, 2) == 0x92
    assert sht.crc8(buf, 2) == crc8(buf, 2, 4) == 0x81
    forget_app()


async def test_sht3x_converts_what_the_simulated_sensor_measures():
    sht = _sht3x()
    c = Control("/tmp/mpytest-control-sht-" + _tag())
    CREATED.append(c.path)
    await control(c)
    bus = FakeI2C(c)  # the board's fake bus, built directly
    s = sht.SHT3x(bus)
    t, rh = await s.measure()
    # 16 bits over 175 C / 100 %: a step of 0.0027 C, 0.0015 %.
    assert abs(t - 21.5) < 0.003 and abs(rh - 45) < 0.002, (t, rh)
    for temp, hum in ((31.5, 40), (0, 0), (-40.25, 99.5), (125, 100)):
        await control(c, "sht3x_temp=%s" % temp, "sht3x_hum=%s" % hum)
        t, rh = await s.measure()
        assert abs(t - temp) < 0.003 and abs(rh - hum) < 0.002, (temp, hum, t, rh)
    assert bus.scan() == [SHT3X_ADDR]
    forget_app()


async def test_a_bad_crc_raises_and_a_good_reply_after_it_reads_again():
    sht = _sht3x()
    c = Control("/tmp/mpytest-control-crc-" + _tag())
    CREATED.append(c.path)
    await control(c, "sht3x-badcrc")
    s = sht.SHT3x(FakeI2C(c))
    s.start()
    await asyncio.sleep_ms(sht.MEASURE_MS)
    e = raises(ValueError, s.result)
    assert "CRC" in str(e)
    await control(c)
    t, _ = await s.measure()
    assert abs(t - 21.5) < 0.003


async def test_an_absent_sensor_a_failing_bus_and_an_early_read_raise_oserror():
    sht = _sht3x()
    c = Control("/tmp/mpytest-control-nack-" + _tag())
    CREATED.append(c.path)
    await control(c)
    bus = FakeI2C(c)
    absent = sht.SHT3x(bus, addr=0x45)  # ADDR pin high: nobody there
    assert raises(OSError, absent.start).errno == errno.ENODEV
    s = sht.SHT3x(bus)
    # Read before the measurement is done (no wait): the sensor does not acknowledge.
    s.start()
    assert raises(OSError, s.result).errno == errno.ENODEV
    # A result is read once; without a new measurement there is none.
    await s.measure()
    assert raises(OSError, s.result).errno == errno.ENODEV
    await control(c, "i2c-fail")
    assert raises(OSError, s.start).errno == errno.EIO
    assert raises(OSError, bus.scan).errno == errno.EIO
    await control(c)
    await s.measure()
    forget_app()


# ---- the env_sensor app ------------------------------------------------------------------


def test_threshold_fires_once_above_and_once_below_the_hysteresis():
    app = load_app("env_sensor")
    th = app.Threshold()
    seq = [(25, None), (30, None), (30.1, "above"), (35, None), (30.1, None), (29.5, None),
           (29.0, None), (28.9, "below"), (28, None), (29.9, None), (30.5, "above")]
    got = [(v, th.update(v, 30, 1)) for v, _ in seq]
    assert got == seq, got
    # Hysteresis 0: back below the limit itself is "below".
    th = app.Threshold()
    assert [th.update(v, 10, 0) for v in (11, 10, 9.99)] == ["above", None, "below"]
    forget_app()


async def test_env_app_reads_the_sensor_and_alarms_with_hysteresis():
    app = load_app("env_sensor")
    b = _board("env")
    dev = FakeDev(b)
    app.setup(dev)
    assert dev.settings == {"threshold": ("num", 30, -40, 125, None),
                            "hysteresis": ("num", 1, 0, 20, None)}
    read = dev.sensors["env"]
    r = await read()
    assert r == {"temp_c": 21.5, "rh": 45.0}, r
    assert dev.events == [] and dev.states == [("env_alarm", False)]

    async def at(temp):
        await control(b, "sht3x_temp=%s" % temp, "sht3x_hum=40")
        return await read()

    assert (await at(31.5)) == {"temp_c": 31.5, "rh": 40.0}
    assert dev.events == [("threshold", {"state": "above", "temp_c": 31.5, "threshold": 30})]
    assert dev.states[-1] == ("env_alarm", True)
    await at(32)
    await at(29.5)  # under the threshold, not under threshold - hysteresis
    assert len(dev.events) == 1 and len(dev.states) == 2
    await at(28.5)
    assert dev.events[-1] == ("threshold", {"state": "below", "temp_c": 28.5, "threshold": 30})
    assert dev.states[-1] == ("env_alarm", False) and len(dev.states) == 3
    # A live change of the threshold applies from the next reading.
    dev.change("threshold", 25)
    await read()
    assert dev.events[-1] == ("threshold", {"state": "above", "temp_c": 28.5, "threshold": 25})
    # A failing sensor raises (the firmware counts it) and is no crossing.
    await control(b, "i2c-fail")
    await _raises_async(OSError, read)
    await control(b, "sht3x-badcrc")
    await _raises_async(ValueError, read)
    assert len(dev.events) == 3 and dev.states[-1] == ("env_alarm", True)
    forget_app()


async def _raises_async(exc, fn):
    try:
        await fn()
    except exc as e:
        return e
    raise AssertionError("%s not raised" % exc.__name__)


# ---- the relay app -----------------------------------------------------------------------


def _relay_app(name):
    app = load_app("relay")
    b = _board(name)
    dev = FakeDev(b)
    app.setup(dev)
    return app, b, dev


async def test_relay_command_switches_the_pin_and_reports_state():
    app, b, dev = _relay_app("relay")
    pin = b.pin(app.RELAY_PIN)
    assert dev.settings == {"max_on_s": ("num", 300, 1, 86400, None)}
    # Off from the start, and this boot's state says so.
    assert pin.value() == 0 and len(dev.states) == 1
    name, st = dev.states[0]
    assert name == "relay" and st["on"] is False
    assert isinstance(st["since"], float)  # the Unix board's clock is always set
    cmd = dev.commands["relay"]
    assert (await cmd({"on": True})) == {"on": True}
    assert pin.value() == 1 and dev.states[-1][1]["on"] is True and len(dev.states) == 2
    # On again: no change to report.
    assert (await cmd({"on": True})) == {"on": True} and len(dev.states) == 2
    for bad in ({}, {"on": 1}, {"on": "true"}, {"on": None}, {"state": True}):
        e = await _raises_async(ValueError, lambda: cmd(bad))
        assert '{"on": true}' in str(e), e
    assert pin.value() == 1
    assert (await cmd({"on": False})) == {"on": False}
    assert pin.value() == 0 and dev.states[-1][1]["on"] is False and len(dev.states) == 3
    assert dev.named("relay_timeout") == []
    forget_app()


def test_relay_timer_is_due_after_max_on_with_an_injected_clock():
    app = load_app("relay")
    b = _board("timer")
    # Ticks start 60 s before the board's 2^30 wrap: this deadline lies beyond it.
    start = b.ticks_add(b.ticks_ms(), 59000)
    t = app.RelayTimer(b.ticks_diff, 5000)
    assert t.left_ms(start) is None
    t.switched(True, start)
    assert t.left_ms(b.ticks_add(start, 4999)) == 1
    assert t.left_ms(b.ticks_add(start, 5000)) == 0
    assert t.left_ms(b.ticks_add(start, 6000)) == -1000
    assert b.ticks_add(start, 5000) < start  # wrapped
    t.switched(False, b.ticks_add(start, 100))
    assert t.left_ms(b.ticks_add(start, 6000)) is None
    forget_app()


async def test_relay_step_switches_off_once_at_max_on_s():
    app = load_app("relay")
    b = _board("step")
    dev = FakeDev(b)
    r = app.Relay(dev, b.pin(app.RELAY_PIN, out=True))
    r.max_on_changed(2)
    r.switch(True)
    on_at = r.timer.on_at
    assert r.step(b.ticks_add(on_at, 500)) == 1500 and r.on
    # On again (a repeated command): the timer keeps counting from the first.
    r.switch(True)
    assert r.timer.on_at == on_at
    assert r.step(b.ticks_add(on_at, 1999)) == 1 and r.on
    assert dev.named("relay_timeout") == []
    assert r.step(b.ticks_add(on_at, 2000)) == app.IDLE_MS and not r.on
    assert dev.named("relay_timeout") == [{"on_s": 2.0, "max_on_s": 2.0}]
    assert b.pin(app.RELAY_PIN).value() == 0 and dev.states[-1][1]["on"] is False
    assert r.step(b.ticks_add(on_at, 9000)) == app.IDLE_MS  # off: nothing more
    assert len(dev.named("relay_timeout")) == 1
    # A long limit: the task looks again after IDLE_MS, to check in with the watchdog.
    r.max_on_changed(300)
    r.switch(True)
    assert r.step(r.timer.on_at) == app.IDLE_MS
    forget_app()


async def test_relay_task_switches_off_and_reacts_to_a_live_max_on_s():
    app, b, dev = _relay_app("task")
    task = asyncio.create_task(dev.tasks["relay-timer"]())
    try:
        cmd = dev.commands["relay"]
        await cmd({"on": True})
        await _until(lambda: dev.beats, what="a beat")
        # Default 300 s: the task sleeps IDLE_MS (10 s) and checks in for a bit longer.
        assert dev.beats[-1] == app.IDLE_MS + app.BEAT_SLACK_MS, dev.beats
        t0 = b.ticks_ms()
        # 50 ms, below the setting's low of 1 s (the fake dev does not check limits): the
        # sleeping task must wake for it, not wait out its 10 s.
        dev.change("max_on_s", 0.05)
        await _until(lambda: dev.named("relay_timeout"), ms=2000, what="relay_timeout")
        assert b.ticks_diff(b.ticks_ms(), t0) < 2000
        ev = dev.named("relay_timeout")
        assert len(ev) == 1 and ev[0]["max_on_s"] == 0.05 and ev[0]["on_s"] >= 0.05, ev
        assert b.pin(app.RELAY_PIN).value() == 0
        assert dev.states[-1][0] == "relay" and dev.states[-1][1]["on"] is False
        assert [l for l in dev.logs if l[0] == "W" and "relay off" in l[1]]
        # On again with the short limit: off again by itself, each time one event.
        await cmd({"on": True})
        await _until(lambda: len(dev.named("relay_timeout")) == 2, ms=2000, what="2nd timeout")
        assert b.pin(app.RELAY_PIN).value() == 0
        assert not task.done()
    finally:
        task.cancel()
        forget_app()


# ---- the checkout's app/ -----------------------------------------------------------------


async def test_the_checkouts_app_shows_the_shape():
    app = load_app(None)
    dev = FakeDev(_board("root"))
    app.setup(dev)
    assert dev.settings["greeting"][:2] == ("str", "hello")
    assert dev.sensors["hellos"]() == 0
    assert (await dev.commands["hello"]({})) == {"text": "hello, world"}
    dev.change("greeting", "hi")
    assert (await dev.commands["hello"]({"name": "ops"})) == {"text": "hi, ops"}
    assert dev.sensors["hellos"]() == 2
    forget_app()


# ---- the boards' hardware ------------------------------------------------------------------


async def test_unix_board_keeps_its_bus_and_pins():
    b = _board("hw")
    bus = b.i2c()
    assert b.i2c(0, scl=22, sda=21) is bus and b.i2c(1) is not bus
    assert b.i2c(1).devices is bus.devices  # one simulated sensor on both
    raises(ValueError, b.i2c, 2)
    out = b.pin(22, out=True)
    out.value(1)
    assert b.pin(22) is out and out.value() == 1  # asking again leaves it an output
    out.off()
    assert b.pin(22).value() == 0
    inp = b.pin(5)
    assert inp.value() == 0
    await control(b, "pin5=1")
    assert inp.value() == 1
    # The next boot's app gets a new one: a reset lets go of the pins.
    b.reset()
    again = Hardware(b.board)
    assert again.pin(22) is not out and again.pin(22).value() == 0


def test_mcu_board_uses_hardware_i2c_and_falls_back_to_soft_i2c():
    made = []

    class Pin:
        IN = 1
        OUT = 3

        def __init__(self, id, mode=None):
            self.id = id
            self.mode = mode

    class I2C:
        def __init__(self, id, scl=None, sda=None, freq=400000):
            # The RP2040's I2C0 takes SCL on GP1/5/9/... only.
            if scl is not None and scl.id % 4 != 1:
                raise ValueError("bad SCL pin")
            made.append(("I2C", id, scl and scl.id, sda and sda.id, freq))

    class SoftI2C:
        def __init__(self, scl, sda, freq=400000, timeout=50000):
            made.append(("SoftI2C", scl.id, sda.id, freq))

    machine = _Fake(Pin=Pin, I2C=I2C, SoftI2C=SoftI2C, unique_id=lambda: b"\x01\x02")
    network = _Fake(STA_IF=0, WLAN=lambda iface: _Fake())

    def check(mcuhw):
        b = mcuhw.Hardware(None)
        b.i2c()
        b.i2c(1, freq=400000)
        b.i2c(0, scl=5, sda=4)
        b.i2c(0, scl=22, sda=21)
        assert made == [("I2C", 0, None, None, 100000), ("I2C", 1, None, None, 400000),
                        ("I2C", 0, 5, 4, 100000), ("SoftI2C", 22, 21, 100000)], made
        p = b.pin(22, out=True)
        assert (p.id, p.mode) == (22, Pin.OUT)
        assert b.pin(4).mode == Pin.IN

    _with_fakes({"machine": machine, "network": network}, check)


class _Fake:
    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


def _with_fakes(fakes, check):
    """check(firmware.boards.mcuhw) imported against fake hardware modules."""
    with_fake_modules(fakes, ("firmware.boards.mcuhw",), lambda: check(
        __import__("firmware.boards.mcuhw", None, None, ["Hardware"])))
