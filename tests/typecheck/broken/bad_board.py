# Deliberately wrong hardware calls: the type-check must reject this file, which proves the
# board check is wired to the MicroPython stubs and not passing vacuously.
import machine
import network

wdt = machine.WDT(timeot=8000)
network.WLAN(network.STA_IF).conect("ssid", "pw")
