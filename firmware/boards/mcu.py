# What ESP32 and RP2040 boards share: the root filesystem, the clock, the watchdog and
# Wi-Fi station handling. Board modules subclass McuBoard and add their own sensors.
import os
import time

import machine
import network

from firmware.boards.base import BaseBoard
from otaboot import WDT_MAX_MS, RootFs

# Seconds from 1970 to 2000, the epoch of ports built without a 1970 epoch.
_EPOCH_OFFSET = 0 if time.gmtime(0)[0] == 1970 else 946684800
_VALID_AFTER = 1700000000  # an RTC earlier than late 2023 has not been set


# machine.reset_cause() values by name; a port lacks the ones it cannot tell apart.
_CAUSES = (("PWRON_RESET", "power-on"), ("HARD_RESET", "hard"), ("WDT_RESET", "watchdog"),
           ("SOFT_RESET", "soft"), ("DEEPSLEEP_RESET", "deepsleep"))


class WlanLink:
    """The station interface with the methods firmware/wifi.py uses."""

    def __init__(self, power_save=True):
        self.wlan = network.WLAN(network.STA_IF)
        self.power_save = power_save

    def connect(self, ssid, password):
        self.wlan.active(True)
        if not self.power_save:
            # CYW43 "performance" mode: power saving drops MQTT packets on the Pico W.
            self.wlan.config(pm=0xA11140)
        self.wlan.connect(ssid, password)

    def isconnected(self):
        return self.wlan.isconnected()

    def disconnect(self):
        try:
            self.wlan.disconnect()
        except OSError:
            pass

    def rssi(self):
        try:
            return self.wlan.status("rssi")
        except (OSError, ValueError):
            return None


class McuBoard(BaseBoard):
    name = "mcu"
    ntp = True
    power_save = True
    max_wdt_ms = WDT_MAX_MS["esp32"]  # boot.py armed it at this (otaboot)
    # The longest deep sleep in one call (a small int on a 32-bit port); a longer one wakes
    # early, which only means an early reading.
    max_sleep_ms = 0x3FFFFFFF

    def __init__(self):
        self.fs = RootFs()
        self.ota_root = ""  # the flash is the root: a slot imports from /ota/a
        self.label = "".join("%02x" % b for b in machine.unique_id())
        self.link = WlanLink(self.power_save)
        self.wdt = None
        self.start_uptime()

    def unix_time(self):
        t = time.time() + _EPOCH_OFFSET
        return round(t, 3) if t > _VALID_AFTER else None

    def set_time(self, unix_s, ms):
        """The RTC to UTC unix_s + ms (ints: a 32-bit float cannot hold today to the
        second); the port's epoch may be 2000."""
        # gmtime: year, month, day, h, m, s, weekday, ... (8 or 9 fields by port).
        t = time.gmtime(unix_s - _EPOCH_OFFSET)
        # RTC.datetime order: year, month, day, weekday, h, m, s, subseconds (ESP32: us).
        machine.RTC().datetime((t[0], t[1], t[2], t[6], t[3], t[4], t[5], ms * 1000))

    def reset_cause(self):
        rc = machine.reset_cause()
        for name, cause in _CAUSES:
            if getattr(machine, name, None) == rc:
                return cause
        return "unknown"

    def arm_watchdog(self, timeout_ms):
        # Arming again sets the new timeout; a WDT once armed cannot be stopped.
        self.wdt = machine.WDT(timeout=min(timeout_ms, self.max_wdt_ms))

    def feed_watchdog(self):
        if self.wdt is not None:
            self.wdt.feed()

    def reset(self):
        machine.reset()

    def deep_sleep(self, ms):
        # The radio first: a station left associated costs the first milliseconds of
        # the next wake's join, and some ports do not power it down by themselves.
        self.link.disconnect()
        machine.deepsleep(min(ms, self.max_sleep_ms))
