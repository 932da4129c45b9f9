# Telemetry producer: one reading per interval, starting at a random per-device phase so a
# fleet's reports never align, each tagged (boot, seq) so consumers detect gaps and repeats.
import asyncio
import json

from firmware.version import SCHEMA


class Telemetry:
    def __init__(self, board, rnd, publish, topic, boot, interval, dropped=None):
        self.board = board
        self.rnd = rnd
        self.publish = publish  # fn(topic, payload, boot, seq) that queues it, never blocks
        self.dropped = dropped  # fn() -> messages the outbox dropped so far, or None
        self.topic = topic
        self.boot = boot
        self.interval = interval
        self.seq = 0

    def payload(self):
        """Build the next message (README "telemetry"); advances seq."""
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
        msg.update(self.board.read_sensors(self.rnd))
        d = self.dropped() if self.dropped else 0
        if d:
            # Counted drops make a gap explainable (README "Offline queue").
            msg["dropped"] = d
        return json.dumps(msg)

    async def run(self):
        await asyncio.sleep(self.rnd.uniform(0, self.interval))
        while True:
            payload = self.payload()
            self.publish(self.topic, payload, self.boot, self.seq)
            await asyncio.sleep(self.interval)
