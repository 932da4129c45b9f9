# ESP32 board's built-in reading on every chip of the family: mcu_temperature() (S2, S3, C3,
# C6: Celsius), raw_temperature() (classic ESP32: Fahrenheit), neither, or a read that fails;
# and the RP2's ADC read failing. The board modules run against fake esp32, machine and
# network modules put into sys.modules, which the import statement takes before any
# built-in module; the board modules are dropped again afterwards so no other test sees them.
import sys

import firmware.boards
from mpyutil import with_fake_modules

FAKES = ("esp32", "machine", "network")
BOARDS = ("firmware.boards.esp32", "firmware.boards.rp2", "firmware.boards.mcu")


class Fake:
    pass


def _fakes(esp32):
    machine = Fake()
    machine.unique_id = lambda: b"\x0a\x0b\x0c"
    machine.reads = 0

    class ADC:
        def __init__(self, ch):
            assert ch == 4
            self.value = 14000  # ~27 C

        def read_u16(self):
            machine.reads += 1
            if self.value is None:
                raise OSError(5)
            return self.value

    machine.ADC = ADC

    class RTC:
        kept = b""  # the chip's: every RTC object reads the same memory

        def memory(self, data=None):
            if data is None:
                return RTC.kept
            assert len(data) <= 2048
            RTC.kept = bytes(data)

    machine.RTC = RTC
    machine.slept = []
    machine.deepsleep = machine.slept.append
    network = Fake()
    network.STA_IF = 0

    def wlan(iface):
        w = Fake()
        w.disconnect = lambda: machine.slept.append("radio off")
        return w

    network.WLAN = wlan
    return {"esp32": esp32, "machine": machine, "network": network}


def _with_board(module, esp32, check):
    """check(board, fakes) on a Board of firmware.boards.`module` built with the fakes."""
    fakes = _fakes(esp32)

    def build():
        mod = __import__("firmware.boards." + module, None, None, ["Board"])
        check(mod.Board(), fakes)

    with_fake_modules(fakes, BOARDS, build)


def _esp32(**funcs):
    m = Fake()
    for k, v in funcs.items():
        setattr(m, k, v)
    return m


def test_mcu_temperature_of_the_s2_s3_c3_c6_is_celsius():
    calls = []

    def mcu():
        calls.append(1)
        return 41  # an int: the port rounds it

    def check(b, fakes):
        assert calls == []  # picked at construction, read only when sampled
        r = b.read_sensors(None)
        assert r == {"temp_c": 41.0} and isinstance(r["temp_c"], float), r
        assert len(calls) == 1

    _with_board("esp32", _esp32(mcu_temperature=mcu), check)


def test_raw_temperature_of_the_classic_esp32_is_fahrenheit_converted():
    def check(b, fakes):
        assert b.read_sensors(None) == {"temp_c": 45.0}
        fakes["esp32"].raw = 132.8
        assert b.read_sensors(None) == {"temp_c": 56.0}

    esp32 = _esp32()
    esp32.raw = 113
    esp32.raw_temperature = lambda: esp32.raw
    _with_board("esp32", esp32, check)


def test_mcu_temperature_is_preferred_when_both_exist():
    def check(b, fakes):
        assert b.read_sensors(None) == {"temp_c": 30.0}

    _with_board("esp32", _esp32(mcu_temperature=lambda: 30, raw_temperature=lambda: 200), check)


def test_a_chip_without_a_sensor_publishes_no_reading():
    def check(b, fakes):
        assert b.die_c is None
        assert b.read_sensors(None) == {}

    _with_board("esp32", _esp32(idf_heap_info=lambda cap: []), check)


def test_a_failing_read_gives_no_reading_instead_of_an_error():
    state = {"fail": True}

    def mcu():
        if state["fail"]:
            raise OSError(116)
        return 38

    def check(b, fakes):
        assert b.read_sensors(None) == {}
        state["fail"] = False
        assert b.read_sensors(None) == {"temp_c": 38.0}

    _with_board("esp32", _esp32(mcu_temperature=mcu), check)

    def raw():
        raise OSError(5)

    def check_raw(b, fakes):
        assert b.read_sensors(None) == {}

    _with_board("esp32", _esp32(raw_temperature=raw), check_raw)


def test_rp2_adc_read_failing_gives_no_reading():
    def check(b, fakes):
        r = b.read_sensors(None)
        assert list(r) == ["temp_c"] and 20 < r["temp_c"] < 35, r
        b.adc.value = None
        assert b.read_sensors(None) == {}
        assert fakes["machine"].reads == 2

    _with_board("rp2", None, check)


def test_the_fakes_are_gone_afterwards():
    for n in FAKES + BOARDS:
        m = sys.modules.get(n)
        assert not isinstance(m, Fake), n
    assert "firmware.boards.esp32" not in sys.modules
    assert "firmware.boards.mcu" not in sys.modules
    assert "esp32" not in dir(firmware.boards) and "mcu" not in dir(firmware.boards)


def test_esp32_sleep_memory_is_the_rtc_memory_and_deep_sleep_turns_the_radio_off_first():
    def check(b, fakes):
        assert b.sleep_memory.size == 2048
        b.sleep_memory.write(b"kept")
        assert fakes["machine"].RTC().memory() == b"kept" == b.sleep_memory.read()
        b.deep_sleep(1500)
        assert fakes["machine"].slept == ["radio off", 1500]

    _with_board("esp32", _esp32(), check)


def test_rp2_has_no_sleep_memory():
    def check(b, fakes):
        assert b.sleep_memory is None  # the duty cycle keeps its state on flash

    _with_board("rp2", _esp32(), check)
