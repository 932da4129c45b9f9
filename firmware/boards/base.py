# What every board does the same way (entropy, monotonic clock, console log); no hardware
# imports here, so the Unix board can share it.
import os
import time


class BaseBoard:
    name = "base"
    ntp = False  # True: the clock starts unset and SNTP sets it (set_time)

    def entropy(self):
        b = os.urandom(4)
        return b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)

    def ticks_ms(self):
        return time.ticks_ms()

    def log(self, line):
        print(line)

    def read_sensors(self, rnd):
        return {}

    async def sample(self, rnd):
        """The readings of one telemetry message; async so a driver may wait on hardware."""
        return self.read_sensors(rnd)

    def reset_cause(self) -> str:
        return "unknown"

    def arm_watchdog(self, timeout_ms):
        pass

    def feed_watchdog(self):
        pass
