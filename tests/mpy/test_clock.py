# The board's tick period emulated, the wrap-free uptime and long sleeps (firmware/clock.py):
# what a 32-bit board does at its 12.4-day wrap, where the 64-bit port never goes.
import asyncio

from firmware.clock import MAX_SLEEP_MS, PERIOD, EmulatedTicks, Uptime, sleep_s

HALF = PERIOD // 2


class Host:
    def __init__(self, t=1000):
        self.t = t

    def ms(self):
        return self.t


def raises(exc, fn, *args):
    try:
        fn(*args)
    except exc:
        return True
    return False


def test_emulated_ticks_start_before_the_wrap_and_wrap_to_zero():
    host = Host(5000)
    t = EmulatedTicks(host.ms, 2000)
    assert t.now() == PERIOD - 2000
    host.t += 1999
    assert t.now() == PERIOD - 1
    host.t += 1
    assert t.now() == 0
    host.t += 10
    assert t.now() == 10


def test_emulated_diff_and_add_behave_like_a_boards():
    d, a = EmulatedTicks.diff, EmulatedTicks.add
    assert d(5, PERIOD - 5) == 10  # across the wrap
    assert d(PERIOD - 5, 5) == -10
    assert d(HALF - 1, 0) == HALF - 1
    assert d(HALF, 0) == -HALF  # ticks_diff spans half the period only
    assert a(PERIOD - 5, 10) == 5
    assert a(3, -5) == PERIOD - 2
    assert raises(OverflowError, a, 0, HALF)
    assert raises(OverflowError, a, 0, -HALF - 1)
    assert not raises(OverflowError, a, 0, HALF - 1)


def test_the_shift_drives_the_ticks_forward():
    host = Host()
    shift = [0]
    t = EmulatedTicks(host.ms, 60000, lambda: shift[0])
    t0 = t.now()
    shift[0] = 1 << 28
    assert EmulatedTicks.diff(t.now(), t0) == 1 << 28


def test_uptime_counts_across_several_wraps_without_wrapping():
    host = Host()
    t = EmulatedTicks(host.ms, 60000)
    up = Uptime(t.now, t.diff)
    total = 0
    step = (1 << 28) + 777  # each look within what ticks_diff spans
    for _ in range(20):  # 20 x 2^28 ms: 62 days, five wraps
        host.t += step
        total += step
        assert up.ms() == total
    assert up.s() == total // 1000
    assert up.s() > 5 * PERIOD // 1000


def test_uptime_is_wrong_only_if_nobody_looks_for_half_a_period():
    # The limit the supervisor's regular look exists for.
    host = Host()
    t = EmulatedTicks(host.ms, 0)
    up = Uptime(t.now, t.diff)
    host.t += HALF + 5
    assert up.ms() != HALF + 5


def test_sleep_s_sleeps_a_week_in_steps_a_board_accepts():
    steps = []

    async def fake_sleep_ms(ms):
        EmulatedTicks.add(0, ms)  # raises as a board's ticks_add would at 2^29
        steps.append(ms)

    asyncio.run(sleep_s(907200, fake_sleep_ms))  # refresh_interval max x 1.5
    assert sum(steps) == 907200000
    assert max(steps) == MAX_SLEEP_MS < HALF
    steps.clear()
    asyncio.run(sleep_s(0.25, fake_sleep_ms))
    assert steps == [250]


def test_tick_arithmetic_matches_the_modular_definition():
    # The arithmetic avoids big ints on a 32-bit port; it must still be the modular one.
    from backoff import Rng

    r = Rng(11)
    mask = PERIOD - 1
    edges = [0, 1, HALF - 1, HALF, HALF + 1, mask - 1, mask]
    vals = edges + [int(r.random() * PERIOD) & mask for _ in range(300)]
    for k in range(len(vals) - 1):
        a, b = vals[k], vals[k + 1]
        assert EmulatedTicks.diff(a, b) == ((a - b + HALF) & mask) - HALF, (a, b)
        d = EmulatedTicks.diff(a, b)
        assert EmulatedTicks.add(b, d) == a, (a, b)
        assert 0 <= EmulatedTicks.add(a, -HALF) <= mask
    host = Host(mask - 5)
    shift = [0]
    t = EmulatedTicks(host.ms, 3, lambda: shift[0])
    for s in edges + [5 * PERIOD + 7]:
        shift[0] = s
        assert t.now() == (PERIOD - 3 + s) & mask, s


def test_emulated_ticks_allocate_nothing():
    # Called on every stamp; a big int per call on the 32-bit board-model build would be
    # garbage a board never makes (only that build can catch it: 64-bit ints are small).
    import gc

    host = Host(PERIOD - 2)
    shift = [3 * (1 << 28)]
    t = EmulatedTicks(host.ms, 60000, lambda: shift[0])
    a = t.now()
    gc.collect()
    gc.disable()
    try:
        before = gc.mem_alloc()
        for _ in range(100):
            b = t.now()
            EmulatedTicks.diff(b, a)
            EmulatedTicks.add(b, HALF - 1)
            EmulatedTicks.add(b, -HALF)
        used = gc.mem_alloc() - before
    finally:
        gc.enable()
    assert used < 100, used
