# Telemetry producer: a reading at boot, then one per interval at a random per-device phase so
# a fleet's reports never align, each tagged (boot, seq) so consumers detect gaps and repeats.
import asyncio
import json

from firmware.version import SCHEMA


class Telemetry:
    def __init__(self, board, rnd, publish, topic, boot, interval, dropped=None, beat=None,
                 app=None):
        self.board = board
        self.rnd = rnd
        self.publish = publish  # fn(topic, payload, boot, seq) that queues it, never blocks
        self.dropped = dropped  # fn() -> messages the outbox dropped so far, or None
        self.topic = topic
        self.boot = boot
        self.interval = interval
        self.seq = 0
        self.beat = beat or (lambda ms: None)  # watchdog check-in: fn(next within ms)
        self.app = app  # firmware/apphost.py's AppHost: the application's sensors

    def payload(self, readings):
        """Build the next message (README "telemetry") around `readings`; advances seq."""
        self.seq += 1
        msg = {
            "v": SCHEMA,
            "seq": self.seq,
            "boot": self.boot,
            "up": self.board.uptime_ms(),
        }
        ts = self.board.unix_time()
        if ts is not None:
            msg["ts"] = ts
        msg.update(readings)
        d = self.dropped() if self.dropped else 0
        if d:
            # Counted drops make a gap explainable (README "Offline queue").
            msg["dropped"] = d
        return json.dumps(msg)

    async def take(self):
        """One reading, queued (a duty-cycled wake takes exactly one)."""
        # A sensor read may wait on hardware; one that outlasts the supervisor's grace (the
        # watchdog timeout) stops the check-ins.
        self.beat(0)
        readings = await self.board.sample(self.rnd)
        if self.app:
            await self.app.read_into(readings, self.beat)
        self.publish(self.topic, self.payload(readings), self.boot, self.seq)

    async def run(self):
        # The boot reading goes out at once (it shows the device is back); the schedule
        # after it starts at a random phase.
        await self.take()
        phase = self.rnd.uniform(0, self.interval)
        self.beat(int(phase * 1000))
        await asyncio.sleep(phase)
        while True:
            await self.take()
            # The interval can change live (config twin); the promise follows it.
            self.beat(int(self.interval * 1000))
            await asyncio.sleep(self.interval)
