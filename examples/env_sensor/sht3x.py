# Driver for the Sensirion SHT3x (SHT30/31/35) temperature and humidity sensor on I2C:
# single-shot measurements, checked by the sensor's CRC. Works on any object with
# machine.I2C's writeto() and readfrom_into() (the board's bus, or the Unix port's fake).
import asyncio

from micropython import const

ADDR = const(0x44)  # ADDR pin low; 0x45 with it high
# Single shot, high repeatability, no clock stretching: the sensor lets go of the bus
# while it measures, so a slow measurement never holds other devices up; a read before it
# is done is not acknowledged (OSError), hence the wait.
_MEASURE = b"\x24\x00"
MEASURE_MS = const(16)  # the datasheet's 15 ms at most, plus a margin for the clock
_SOFT_RESET = b"\x30\xa2"


def crc8(buf, start):
    """Sensirion's CRC-8 (polynomial 0x31, init 0xFF) of the two bytes buf[start:start+2]."""
    crc = 0xFF
    for i in range(start, start + 2):
        crc ^= buf[i]
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


class SHT3x:
    def __init__(self, i2c, addr=ADDR):
        self.i2c = i2c
        self.addr = addr
        self._buf = bytearray(6)  # one reply, reused: a measurement allocates only its floats

    def start(self):
        """Begin a measurement; its result can be read MEASURE_MS later."""
        self.i2c.writeto(self.addr, _MEASURE)

    def result(self):
        """(Celsius, %RH) of the measurement started; ValueError on a CRC mismatch (the
        bytes were corrupted on the way), OSError if the sensor does not answer."""
        b = self._buf
        self.i2c.readfrom_into(self.addr, b)
        if crc8(b, 0) != b[2] or crc8(b, 3) != b[5]:
            raise ValueError("SHT3x: CRC mismatch")
        # The datasheet's conversion: T = -45 + 175 * S_T / (2^16 - 1) in Celsius,
        # RH = 100 * S_RH / (2^16 - 1) in percent.
        t = -45 + 175 * ((b[0] << 8) | b[1]) / 65535
        rh = 100 * ((b[3] << 8) | b[4]) / 65535
        return t, rh

    async def measure(self):
        """One measurement, the wait spent on the event loop rather than blocking it."""
        self.start()
        await asyncio.sleep_ms(MEASURE_MS)
        return self.result()

    def reset(self):
        """Soft reset: back to the power-on state (e.g. after an interrupted transfer)."""
        self.i2c.writeto(self.addr, _SOFT_RESET)
