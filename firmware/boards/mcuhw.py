# A microcontroller board as its application sees it (dev.board): I2C buses and GPIO pins
# through MicroPython's machine module, and everything else of the board. Loaded with an
# application (firmware/apphost.py), so a device without one never holds it.
import machine


class Hardware:
    def __init__(self, board):
        self.board = board

    def __getattr__(self, name):
        return getattr(self.board, name)

    def i2c(self, bus=0, scl=None, sda=None, freq=100000):
        # The hardware controller first: it clocks the bits itself, so the timing holds
        # whatever interrupts do, and the ESP32 routes it to any GPIO. The RP2040's two
        # controllers reach only some pins (I2C0: SDA on GP0/4/8/..., SCL on GP1/5/9/...;
        # I2C1 the two after) and refuse others with ValueError: then SoftI2C, bit-banged
        # by the CPU, which takes any pins on both chips.
        if scl is None or sda is None:
            return machine.I2C(bus, freq=freq)  # the port's default pins for that bus
        try:
            return machine.I2C(bus, scl=machine.Pin(scl), sda=machine.Pin(sda), freq=freq)
        except ValueError:
            return machine.SoftI2C(machine.Pin(scl), machine.Pin(sda), freq=freq)

    def pin(self, id, out=False):
        return machine.Pin(id, machine.Pin.OUT if out else machine.Pin.IN)
