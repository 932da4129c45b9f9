# ESP32-family board: the chip's die temperature sensor as the built-in reading; the rest is
# McuBoard.
import esp32
import machine

from firmware.boards.mcu import McuBoard


def _die_sensor():
    """A function giving the die temperature in Celsius, or None: mcu_temperature() on the
    S2, S3, C3, C6 (an int, Celsius), raw_temperature() on the classic ESP32 (Fahrenheit);
    MicroPython has one or the other (ports/esp32/modesp32.c)."""
    f = getattr(esp32, "mcu_temperature", None)
    raw = getattr(esp32, "raw_temperature", None)
    if f is None and raw is not None:
        f = lambda: (raw() - 32) / 1.8  # noqa: E731
    return f


class RtcMemory:
    """The RTC's user memory: kept through deep sleep (and soft, watchdog and panic resets),
    lost when the power goes. 2,048 bytes in the port's default configuration
    (MICROPY_HW_RTC_USER_MEM_MAX)."""

    size = 2048

    def __init__(self):
        self.rtc = machine.RTC()

    def read(self):
        return self.rtc.memory()

    def write(self, data):
        self.rtc.memory(data)


class Board(McuBoard):
    name = "esp32"
    # tls_room stays 0: ESP-IDF's mbedTLS allocates from the system heap, not the GC heap.

    def __init__(self):
        super().__init__()
        self.die_c = _die_sensor()
        self.sleep_memory = RtcMemory()

    def read_sensors(self, rnd):
        # No sensor, or a failed read: telemetry without temp_c rather than none at all.
        if self.die_c is not None:
            try:
                return {"temp_c": round(float(self.die_c()), 1)}
            except OSError:
                pass
        return {}
