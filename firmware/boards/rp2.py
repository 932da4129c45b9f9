# Raspberry Pi Pico W board: the RP2040's internal temperature sensor on ADC 4, and
# Wi-Fi power saving turned off, which otherwise drops MQTT packets.
import machine

from firmware.boards.mcu import McuBoard
from otaboot import WDT_MAX_MS


class Board(McuBoard):
    name = "rp2"
    power_save = False
    max_wdt_ms = WDT_MAX_MS["rp2"]  # the RP2040 watchdog's longest timeout
    # machine.deepsleep is a lightsleep (then a watchdog reset), which refuses 2^32 us or
    # more: about 71 minutes.
    max_sleep_ms = 4294000
    # mbedTLS allocates from the GC heap here: a 16 KiB receive and a 4 KiB send record.
    tls_room = 21504

    def __init__(self):
        super().__init__()
        self.adc = machine.ADC(4)

    def read_sensors(self, rnd):
        try:
            volts = self.adc.read_u16() * 3.3 / 65535
        except OSError:
            return {}  # telemetry without temp_c rather than none at all
        return {"temp_c": round(27 - (volts - 0.706) / 0.001721, 2)}
