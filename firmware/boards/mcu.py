# What ESP32 and RP2040 boards share: the root filesystem, the clock, the watchdog and
# Wi-Fi station handling. Board modules subclass McuBoard and add their own sensors.
import asyncio
import os
import time

import machine
import network

from firmware.boards.base import BaseBoard

# Seconds from 1970 to 2000, the epoch of ports built without a 1970 epoch.
_EPOCH_OFFSET = 0 if time.gmtime(0)[0] == 1970 else 946684800
_VALID_AFTER = 1700000000  # an RTC earlier than late 2023 has not been set


class RootFs:
    """The mounted root filesystem with the same methods as a VfsLfs2 object."""

    def open(self, path, mode="r"):
        return open(path, mode)

    def remove(self, path):
        os.remove(path)

    def rename(self, old, new):
        os.rename(old, new)

    def stat(self, path):
        return os.stat(path)

    def ilistdir(self, path="/"):
        return os.ilistdir(path)

    def mkdir(self, path):
        os.mkdir(path)

    def statvfs(self, path):
        return os.statvfs(path)


class McuBoard(BaseBoard):
    name = "mcu"

    def __init__(self):
        self.fs = RootFs()
        self.label = "".join("%02x" % b for b in machine.unique_id())
        self.wlan = network.WLAN(network.STA_IF)
        self.wdt = None

    def uptime_ms(self):
        return time.ticks_ms()

    def unix_time(self):
        t = time.time() + _EPOCH_OFFSET
        return round(t, 3) if t > _VALID_AFTER else None

    async def network_up(self, networks, timeout_s=15):
        """Join the first reachable network of [(ssid, password)] in priority order."""
        if self.wlan.isconnected():
            return True
        for ssid, password in networks:
            self.wlan_connect(ssid, password)
            for _ in range(timeout_s * 4):
                if self.wlan.isconnected():
                    return True
                await asyncio.sleep_ms(250)
            self.wlan.disconnect()
        return False

    def wlan_connect(self, ssid, password):
        self.wlan.active(True)
        self.wlan.connect(ssid, password)

    def rssi(self):
        try:
            return self.wlan.status("rssi")
        except (OSError, ValueError):
            return None

    def arm_watchdog(self, timeout_ms):
        self.wdt = machine.WDT(timeout=timeout_ms)

    def feed_watchdog(self):
        if self.wdt is not None:
            self.wdt.feed()

    def reset(self):
        machine.reset()
