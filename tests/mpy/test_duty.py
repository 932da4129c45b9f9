# The duty cycle's sleep state: what one wake leaves the next, in RTC memory or on flash.
from firmware.boards.unix import SleepMemory, open_flash
from firmware.duty import SleepState, load_state
from mpyutil import fresh_image


class _Board:
    def __init__(self, mem, fs=None):
        self.sleep_memory = mem
        self.fs = fs


def test_state_and_kept_readings_survive_a_save_and_load():
    mem = SleepMemory()
    st = SleepState(mem, None)
    st.boot, st.seq, st.wakes, st.fails, st.flags = 7, 12, 40, 2, 3
    st.refresh_at, st.health_at = 90, 55
    st.add('{"seq": 11}', 7, 11)
    st.add(b'{"seq": 12}', 7, 12)
    st.save()
    got = load_state(_Board(mem))
    assert got is not None
    assert (got.boot, got.seq, got.wakes, got.fails, got.flags) == (7, 12, 40, 2, 3)
    assert (got.refresh_at, got.health_at) == (90, 55)
    assert list(got.records()) == [(b'{"seq": 11}', 7, 11), (b'{"seq": 12}', 7, 12)]


def test_a_lost_or_damaged_memory_is_no_state():
    mem = SleepMemory()
    assert load_state(_Board(mem)) is None  # after a power cut: empty
    st = SleepState(mem, None)
    st.boot = 3
    st.add(b"x" * 50, 3, 1)
    st.save()
    good = mem.read()
    for i in (0, 5, 12, 40, len(good) - 1):
        bad = bytearray(good)
        bad[i] ^= 0x01
        mem.write(bad)
        assert load_state(_Board(mem)) is None, i
    mem.write(good[:20])
    assert load_state(_Board(mem)) is None


def test_readings_fit_the_memory_and_no_more():
    mem = SleepMemory()
    st = SleepState(mem, None)
    p = b"y" * 100
    n = 0
    while st.fits(p):
        st.add(p, 1, n)
        n += 1
    assert n == (2048 - 32) // (16 + 100)
    st.save()  # exactly what fits is what the memory takes
    assert len(mem.read()) <= 2048


def test_without_sleep_memory_the_state_is_a_flash_file_and_its_writes_are_counted():
    fs = open_flash(fresh_image("duty"), 64 * 4096)[1]
    st = SleepState(None, fs)
    st.boot = 2
    st.add(b"z", 2, 1)
    st.save()
    st.save()
    assert st.flash_writes == 2
    got = load_state(_Board(None, fs))
    assert got is not None and list(got.records()) == [(b"z", 2, 1)]
