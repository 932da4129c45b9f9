# Raspberry Pi Pico W board: the RP2040's internal temperature sensor on ADC 4, and
# Wi-Fi power saving turned off, which otherwise drops MQTT packets.
import machine
import network

from firmware.boards.mcu import McuBoard

_PM_NONE = 0xA11140  # CYW43 "performance" power mode


class Board(McuBoard):
    name = "rp2"

    def __init__(self):
        super().__init__()
        self.adc = machine.ADC(4)

    def read_sensors(self, rnd):
        volts = self.adc.read_u16() * 3.3 / 65535
        return {"temp_c": round(27 - (volts - 0.706) / 0.001721, 2)}

    def wlan_connect(self, ssid, password):
        self.wlan.active(True)
        self.wlan.config(pm=_PM_NONE)
        self.wlan.connect(ssid, password)
