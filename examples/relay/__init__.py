# Example application: a relay on a GPIO, switched by the command "relay" ({"on": true} or
# {"on": false}), its state ("on", "since") in the device's state document, and a safety
# timer that switches it off after app.max_on_s seconds on, saying so in a "relay_timeout"
# event. Installed as the package `app`.
import asyncio

# GPIO 22 drives the relay module's input: a plain output on both the ESP32 and the Pico W
# (ESP32-S2/S3/C3 have no GPIO 22: pick another there).
RELAY_PIN = 22
ON = 1  # the level that closes the relay; 0 for an active-low module
# The timer wakes at least this often when nothing is due, to check in with the watchdog.
IDLE_MS = 10000
BEAT_SLACK_MS = 2000  # beyond the wait: a busy loop may run the task late


class RelayTimer:
    """How long until a relay that is on must go off. Pure: the clock (ticks ms and the
    board's ticks_diff, which handles the wrap) is passed in, so tests need not wait.
    app.max_on_s is at most 86400 s: 86.4e6 ms, within what ticks_diff spans (2^29 ms)."""

    def __init__(self, diff, max_ms):
        self.diff = diff
        self.max_ms = max_ms
        self.on_at = None  # ticks when switched on; None while off

    def switched(self, on, now):
        self.on_at = now if on else None

    def on_ms(self, now):
        return 0 if self.on_at is None else self.diff(now, self.on_at)

    def left_ms(self, now):
        """ms until it must go off (<= 0: now), or None while it is off."""
        return None if self.on_at is None else self.max_ms - self.diff(now, self.on_at)


class Relay:
    def __init__(self, dev, pin):
        self.dev = dev
        self.board = dev.board
        self.pin = pin
        self.on = False
        self.timer = RelayTimer(self.board.ticks_diff, 0)  # max_on_changed sets the limit
        self.wake = asyncio.Event()  # the deadline moved: the safety task looks again
        pin.value(1 - ON)  # off from the boot on, whatever the pin held
        self._report()  # this boot's state document starts without the last boot's

    def switch(self, on):
        """Drive the relay. Switching it on while it is on changes nothing, so the timer
        counts from when it went on: a command repeated by a stuck automation cannot keep
        it on past app.max_on_s."""
        if on == self.on:
            return
        self.pin.value(ON if on else 1 - ON)
        self.on = on
        self.timer.switched(on, self.board.ticks_ms())
        self._report()
        self.wake.set()

    def _report(self):
        # since: the board's clock (unix seconds), None until NTP has set it.
        self.dev.state("relay", {"on": self.on, "since": self.board.unix_time()})

    async def command(self, args):
        on = args.get("on")
        if type(on) is not bool:  # 1 and "true" are not accepted as true
            raise ValueError('relay: the body must be {"on": true} or {"on": false}')
        self.switch(on)
        return {"on": self.on}

    def max_on_changed(self, value):
        self.timer.max_ms = int(value * 1000)
        self.wake.set()  # a shorter limit may be due now

    def step(self, now):
        """Switch off if the relay has been on for app.max_on_s; the ms to wait before
        looking again (the deadline, or IDLE_MS)."""
        left = self.timer.left_ms(now)
        if left is not None and left <= 0:
            on_ms = self.timer.on_ms(now)
            self.switch(False)
            max_s = self.timer.max_ms / 1000
            self.dev.event("relay_timeout", {"on_s": on_ms / 1000, "max_on_s": max_s})
            self.dev.log("W", "relay off after %d ms on (app.max_on_s %s)" % (on_ms, max_s))
            left = None
        return IDLE_MS if left is None or left > IDLE_MS else left

    async def safety(self):
        """The supervised timer task: sleeps until the deadline, woken early by a switch
        or a new app.max_on_s."""
        while True:
            self.wake.clear()  # before step: a change it does not see wakes the wait
            wait = self.step(self.board.ticks_ms())
            self.dev.beat(wait + BEAT_SLACK_MS)
            try:
                await asyncio.wait_for_ms(self.wake.wait(), wait)
            except asyncio.TimeoutError:
                pass


def setup(dev):
    relay = Relay(dev, dev.board.pin(RELAY_PIN, out=True))
    dev.setting("max_on_s", "num", 300, low=1, high=86400, on_change=relay.max_on_changed)
    relay.max_on_changed(dev.get("max_on_s"))  # on_change follows changes only
    dev.command("relay", relay.command)
    dev.task(relay.safety, "relay-timer")
