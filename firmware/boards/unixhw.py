# The Unix board's stand-ins for an application's hardware (dev.board.i2c, .pin), so the
# app's own drivers run unchanged in the simulator and the tests: an I2C bus answering at
# register level, with a simulated SHT3x humidity/temperature sensor at 0x44, and GPIO pins
# that keep their level. The host control file (unix.py's Control) drives them:
#   sht3x_temp=C sht3x_hum=RH   what the SHT3x measures (default 21.5 C, 45 %RH)
#   sht3x-badcrc                its replies carry wrong CRCs (a noisy bus)
#   i2c-fail                    every transfer on the bus raises OSError(EIO) (a stuck bus)
#   pinN=0|1                    the level input pin N reads (default: its last value)
# Loaded with an application (firmware/apphost.py), so a board without one never holds it.
import errno
import time

from micropython import const

SHT3X_ADDR = const(0x44)  # ADDR pin low; 0x45 with it high
_TEMP_C = 21.5
_HUM_RH = 45.0
# Single-shot measurement commands and how long each takes at most (datasheet table 4):
# high, medium, low repeatability without clock stretching; with stretching (0x2Cxx) the
# sensor holds the clock until done, which the instant fake bus makes 0 ms.
_MEASURE = {0x2400: 15, 0x240B: 6, 0x2416: 4, 0x2C06: 0, 0x2C0D: 0, 0x2C10: 0}
_SOFT_RESET = const(0x30A2)


def word_number(control, name, default):
    """The number of a control word `name=N`, else default (Control.number says 0 then,
    and 0 C is a temperature). A half-written file reads as no word."""
    control.has("")  # reads the file again when due
    n = len(name)
    for w in control.words:
        if w.startswith(name) and w[n:n + 1] == "=":
            try:
                return float(w[n + 1:])
            except ValueError:
                break
    return default


def crc8(buf, start, end):
    """Sensirion's CRC-8 (polynomial 0x31, init 0xFF) of buf[start:end]. The sensor's own,
    written apart from any driver's so a test checks the driver against another copy."""
    crc = 0xFF
    for i in range(start, end):
        crc ^= buf[i]
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _raw(value, low, span):
    """A reading as the sensor's 16-bit word: (value - low) / span of full scale."""
    r = int((value - low) * 65535 / span + 0.5)
    return 0 if r < 0 else 65535 if r > 65535 else r


class SimSHT3x:
    """The sensor's end of the bus: a single-shot measurement command, then up to 6 bytes
    (temperature MSB, LSB, CRC, humidity MSB, LSB, CRC) once the measurement is done. As
    the real one, it does not acknowledge its address for a read while it has no result
    (none asked for, still measuring, or already read): OSError(ENODEV)."""

    def __init__(self, control):
        self.control = control
        self._cmd_at = None  # ticks of the pending measurement's command
        self._ms = 0  # its duration
        self._out = bytearray(6)

    def write(self, buf):
        cmd = (buf[0] << 8) | buf[1] if len(buf) == 2 else -1
        if cmd == _SOFT_RESET:
            self._cmd_at = None
            return
        ms = _MEASURE.get(cmd)
        if ms is None:
            # A command this fake does not simulate (periodic mode, heater, status): refused
            # loudly rather than answered with made-up data.
            raise OSError(errno.EIO)
        self._cmd_at = time.ticks_ms()
        self._ms = ms

    def read(self, buf):
        at = self._cmd_at
        if at is None or time.ticks_diff(time.ticks_ms(), at) < self._ms:
            raise OSError(errno.ENODEV)
        self._cmd_at = None  # a result is read once
        c = self.control
        out = self._out
        t = _raw(word_number(c, "sht3x_temp", _TEMP_C), -45, 175)
        h = _raw(word_number(c, "sht3x_hum", _HUM_RH), 0, 100)
        out[0], out[1], out[3], out[4] = t >> 8, t & 0xFF, h >> 8, h & 0xFF
        bad = 0x5A if c.has("sht3x-badcrc") else 0
        out[2] = crc8(out, 0, 2) ^ bad
        out[5] = crc8(out, 3, 5) ^ bad
        for i in range(len(buf)):
            buf[i] = out[i] if i < 6 else 0xFF  # past the data the bus reads idle high


class FakeI2C:
    """machine.I2C's methods over the simulated devices, {address: device with write(buf)
    and read(buf)}. An address nobody acknowledges raises OSError(ENODEV), as MicroPython's
    I2C does; `i2c-fail` in the control file makes every transfer raise OSError(EIO)."""

    def __init__(self, control, devices=None):
        self.control = control
        self.devices = {SHT3X_ADDR: SimSHT3x(control)} if devices is None else devices

    def _device(self, addr):
        if self.control.has("i2c-fail"):
            raise OSError(errno.EIO)
        d = self.devices.get(addr)
        if d is None:
            raise OSError(errno.ENODEV)
        return d

    def writeto(self, addr, buf, stop=True):
        self._device(addr).write(buf)
        return len(buf)  # the ACKs received: every byte's

    def readfrom_into(self, addr, buf, stop=True):
        self._device(addr).read(buf)

    def readfrom(self, addr, nbytes, stop=True):
        buf = bytearray(nbytes)
        self.readfrom_into(addr, buf)
        return bytes(buf)

    def scan(self):
        if self.control.has("i2c-fail"):
            raise OSError(errno.EIO)
        return sorted(self.devices)


class FakePin:
    """A GPIO that keeps the level written to it. An input reads the control file's `pinN=`
    word when there is one, else that kept level."""

    def __init__(self, control, id, out):
        self.control = control
        self.id = id
        self.out = out
        self.level = 0

    def value(self, v=None):
        if v is not None:
            self.level = 1 if v else 0
            return None
        if not self.out:
            return int(word_number(self.control, "pin%s" % self.id, self.level))
        return self.level

    def on(self):
        self.level = 1

    def off(self):
        self.level = 0


class Hardware:
    """A board as its application sees it (dev.board): its buses and pins, kept so that
    every call for a bus or a pin reaches the same simulated device or level, as on a
    board; anything else is the board's. One per boot: a reset lets go of the pins (a
    relay drops), as a board's does."""

    def __init__(self, board):
        self.board = board
        control = self.control = board.control
        # Both buses lead to the one simulated sensor: an app may wire it to either.
        self.devices = {SHT3X_ADDR: SimSHT3x(control)}
        self.buses = {}
        self.pins = {}

    def __getattr__(self, name):
        return getattr(self.board, name)

    def i2c(self, bus=0, scl=None, sda=None, freq=100000):
        # No wires to route: the pins and the speed change nothing here.
        if bus not in (0, 1):  # both chips have two controllers
            raise ValueError("I2C(%s) doesn't exist" % bus)
        b = self.buses.get(bus)
        if b is None:
            b = self.buses[bus] = FakeI2C(self.control, self.devices)
        return b

    def pin(self, id, out=False):
        p = self.pins.get(id)
        if p is None:
            p = self.pins[id] = FakePin(self.control, id, out)
        elif out:
            p.out = True
        # Asking for an input again leaves an output an output (a board's Pin(n, Pin.IN)
        # would make it an input): so a test can read a relay's level back with pin(n).
        return p
