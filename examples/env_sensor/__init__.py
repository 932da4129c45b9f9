# Example application: an SHT3x temperature and humidity sensor on I2C, sent with each
# telemetry message as "env", and an alarm when the temperature goes above a threshold that
# the operator sets (app.threshold, app.hysteresis): a "threshold" event at each crossing
# and "env_alarm" in the device's state document. Installed as the package `app`, so it
# imports its own modules relatively (MicroPython packages support `from .x import y`).
from .sht3x import SHT3x

# Where the sensor is wired: bus 0 on its default pins (they depend on the board: generic
# ESP32 SCL 18 / SDA 19, Pico W SCL GP5 / SDA GP4), or set SCL and SDA to GPIO numbers.
I2C_BUS = 0
SCL = None
SDA = None


class Threshold:
    """Above/below a limit with hysteresis, pure (no hardware, no clock). "above" once when
    a value goes over the limit, then nothing until it falls under limit - hysteresis
    ("below"): a temperature hovering at the limit does not fire with every sample."""

    def __init__(self):
        self.above = False

    def update(self, value, limit, hysteresis):
        """The crossing, "above" or "below", or None. The limits come with every call, so
        an operator's change applies from the next sample."""
        if not self.above:
            if value > limit:
                self.above = True
                return "above"
        elif value < limit - hysteresis:
            self.above = False
            return "below"
        return None


class EnvSensor:
    def __init__(self, dev, sensor):
        self.dev = dev
        self.sensor = sensor
        self.alarm = Threshold()
        self.reported = None  # env_alarm as last put in the state document

    async def read(self):
        """The "env" reading. A sensor that does not answer or fails its CRC raises: the
        firmware counts it and leaves "env" out of that message, and the alarm keeps its
        state (no reading is not a crossing)."""
        t, rh = await self.sensor.measure()
        t = round(t, 2)
        dev = self.dev
        limit = dev.get("threshold")
        crossed = self.alarm.update(t, limit, dev.get("hysteresis"))
        if crossed is not None:
            dev.event("threshold", {"state": crossed, "temp_c": t, "threshold": limit})
        above = self.alarm.above
        if above != self.reported:
            # Only changes: the state document is retained and sent again at each connect.
            self.reported = above
            dev.state("env_alarm", above)
        return {"temp_c": t, "rh": round(rh, 2)}


def setup(dev):
    dev.setting("threshold", "num", 30, low=-40, high=125)  # Celsius: the SHT3x's range
    dev.setting("hysteresis", "num", 1, low=0, high=20)
    env = EnvSensor(dev, SHT3x(dev.board.i2c(I2C_BUS, scl=SCL, sda=SDA)))
    dev.sensor("env", env.read)
