# ESP32 board: the die temperature sensor as the built-in reading; the rest is McuBoard.
import esp32

from firmware.boards.mcu import McuBoard


class Board(McuBoard):
    name = "esp32"
    # tls_room stays 0: ESP-IDF's mbedTLS allocates from the system heap, not the GC heap.

    def read_sensors(self, rnd):
        # raw_temperature() is the classic ESP32's die sensor, in Fahrenheit.
        return {"temp_c": round((esp32.raw_temperature() - 32) / 1.8, 1)}
