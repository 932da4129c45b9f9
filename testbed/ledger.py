"""Consumer-side bookkeeping of telemetry: duplicates and gaps per (device, boot, seq).

This is the dedup rule README gives consumers: a message is identified by (device, boot,
seq); seq restarts at 1 on every boot. A gap is a seq that never arrived and that the
device did not report as dropped (the `dropped` counter field, when present).
"""
import time


class Ledger:
    def __init__(self):
        self.seen = {}  # (device, boot) -> set of seq
        self.dropped = {}  # (device, boot) -> highest dropped count reported
        self.received = 0
        self.duplicates = 0
        self.last_seen = {}  # device -> monotonic time of last telemetry
        self.status = {}  # device -> last status payload

    def telemetry(self, device, msg, now=None):
        key = (device, msg["boot"])
        seqs = self.seen.setdefault(key, set())
        self.received += 1
        if msg["seq"] in seqs:
            self.duplicates += 1
        seqs.add(msg["seq"])
        d = msg.get("dropped")
        if isinstance(d, int):
            self.dropped[key] = max(self.dropped.get(key, 0), d)
        self.last_seen[device] = time.monotonic() if now is None else now

    def gaps(self):
        """Seqs missing below the highest one seen, beyond what the device said it dropped."""
        total = 0
        for key, seqs in self.seen.items():
            missing = max(seqs) - len(seqs)
            total += max(0, missing - self.dropped.get(key, 0))
        return total

    def online(self, window_s=10.0, now=None):
        now = time.monotonic() if now is None else now
        return sum(
            1
            for dev, t in self.last_seen.items()
            # A battery device between wakes says "sleeping" (README "Battery devices").
            if now - t <= window_s
            and self.status.get(dev, {}).get("state") in ("online", "sleeping")
        )

    def summary(self, devices, online=None, now=None):
        """online: a count taken earlier (sim.py takes it before stopping the devices)."""
        return {
            "devices": devices,
            "online": self.online(now=now) if online is None else online,
            "telemetry": self.received,
            "gaps": self.gaps(),
            "duplicates": self.duplicates,
        }
