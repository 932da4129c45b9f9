# ESP32 board: MCU temperature as the built-in sensor; the rest is McuBoard.
import esp32

from firmware.boards.mcu import McuBoard


class Board(McuBoard):
    name = "esp32"

    def read_sensors(self, rnd):
        return {"temp_c": esp32.mcu_temperature()}
