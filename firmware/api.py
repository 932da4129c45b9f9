# The one surface a user's application sees (README "Writing your application"): the
# firmware imports the package `app` at boot and calls `app.setup(dev)` with a Dev. An app
# imports nothing else of the firmware; everything here holds for its data as for the
# firmware's own (queued through outages, deduplicated, validated, watched).


class Dev:
    def __init__(self, host):
        self._h = host  # firmware/apphost.py's AppHost: the bookkeeping behind each call
        # The board, with i2c() and pin() (firmware/boards/mcuhw.py, unixhw.py).
        self.board = host.hardware
        self.id = host.device.name

    def sensor(self, name, read, every=None, timeout_ms=None):
        """`read()` (plain or async) -> number, str, bool or a flat dict of them, sent in
        each telemetry message under `name`; `every=S`: sampled every S seconds instead,
        its last value riding along. A read that raises, times out (default: a quarter of
        the watchdog timeout) or returns another type is counted and left out."""
        self._h.add_sensor(name, read, every, timeout_ms)

    def event(self, name, data, qos=1):
        """Publish `data` (JSON) on devices/{id}/event/{name}: QoS 1 through the offline
        queue (kept through outages and power cuts), QoS 0 only while connected. Never
        blocks or raises for a full queue; False if it was not queued."""
        return self._h.event(name, data, qos)

    def command(self, name, handler):
        """`async handler(args) -> dict` for devices/{id}/cmd/{name}: routed,
        deduplicated, expired and answered as the built-in commands are."""
        self._h.add_command(name, handler)

    def setting(self, name, kind, default, low=None, high=None, choices=None, on_change=None):
        """Declare `app.NAME` in the config twin; kind is num, int, bool, str or choice.
        `on_change(value)` is called when the effective value changes."""
        self._h.add_setting(name, kind, default, low, high, choices, on_change)

    def get(self, name):
        """The effective value of the app setting `name`."""
        return self._h.get(name)

    def state(self, name, value):
        """One entry of the retained document devices/{id}/state (republished at every
        connect); None removes it."""
        return self._h.set_state(name, value)

    def task(self, coro_fn, name):
        """Run `coro_fn()` as a supervised task: restarted with backoff when it raises,
        counted in health, watched once it calls beat()."""
        self._h.add_task(coro_fn, name)

    def beat(self, ms):
        """From inside a dev.task: it will check in again within `ms` (the watchdog stops
        being fed if it does not)."""
        self._h.beat(ms)

    def log(self, level, msg):
        """Into the device's log ring and console; level D, I, W or E."""
        self._h.device.log(level if level in ("D", "I", "W", "E") else "I", "app: %s" % (msg,))
