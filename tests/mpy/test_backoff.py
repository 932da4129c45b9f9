# Jitter and backoff: bounds, cap before randomising, per-instance randomness, and the
# fleet targets of the reconnect policy (README "Never hang, never hammer").
from backoff import Backoff, Fixed, Rng, full_jitter, jittered


def _draws(b, attempt, n=200):
    """n delays of retry `attempt` (next_delay counts attempts: set it back each time)."""
    ds = []
    for _ in range(n):
        b.attempt = attempt
        ds.append(b.next_delay())
    return ds


def _in_upper_half(ds, lo, hi):
    # Within [lo + 3c/4, lo + c] and spread over it, not stuck at one end.
    c = hi - lo
    assert lo + c * 0.75 <= min(ds) < lo + c * 0.77, (lo, hi, min(ds))
    assert lo + c * 0.98 < max(ds) <= hi, (lo, hi, max(ds))


def test_full_jitter_bounds_and_cap():
    r = Rng(1)
    for attempt in range(40):
        ceiling = min(120.0, 1.0 * 2 ** min(attempt, 30))
        for _ in range(50):
            d = full_jitter(attempt, 1.0, 120.0, r)
            assert 0 <= d <= ceiling, (attempt, d)


def test_full_jitter_spreads_over_the_whole_window():
    r = Rng(2)
    ds = [full_jitter(10, 1.0, 120.0, r) for _ in range(2000)]
    assert min(ds) < 6 and max(ds) > 114  # covers [0, cap], not clustered at the cap
    assert 50 < sum(ds) / len(ds) < 70


def test_rng_instances_are_independent():
    a, b = Rng(1), Rng(2)
    assert [a.u32() for _ in range(5)] != [b.u32() for _ in range(5)]
    assert Rng(0).u32() != 0  # zero seed would stick at zero in xorshift
    r = Rng(3)
    xs = [r.random() for _ in range(5000)]
    assert 0 <= min(xs) and max(xs) < 1
    assert 0.47 < sum(xs) / len(xs) < 0.53


def test_backoff_resets_only_after_a_stable_connection():
    b = Backoff(Rng(4), base=1, cap=120, first_window=5, stable_s=30, flap_s=10)
    for _ in range(5):
        b.next_delay()
    assert b.attempt == 5
    b.dropped(15)  # short connection: keeps growing
    assert b.attempt == 6
    d = b.dropped(30)
    assert b.attempt == 0 and 0 <= d <= 5


def test_delay_after_a_short_connection_is_never_below_the_first_window_draw():
    b = Backoff(Rng(7), base=1, cap=120, first_window=5, stable_s=30, flap_s=1)
    ds = [b.dropped(5) for _ in range(200)]
    assert min(ds) >= 0 and max(ds) <= 120
    assert sum(ds[-50:]) / 50 > 20  # attempts kept growing: late delays spread up to the cap


def test_first_short_drop_spreads_over_the_whole_first_window_then_grows():
    # A fleet whose connections were up less than stable_s must still come back spread
    # over [0, first_window], not squeezed into its upper half by the retry floor.
    ds, seconds = [], []
    for i in range(300):
        b = Backoff(Rng(30 + i), first_window=5, stable_s=30, flap_s=10)
        ds.append(b.dropped(15))
        assert b.attempt == 1
        seconds.append(b.dropped(15))
    assert 0 <= min(ds) < 0.3 and 4.7 < max(ds) <= 5
    assert 2 < sum(ds) / len(ds) < 3  # uniform, not weighted to the top
    assert 5 <= min(seconds) and max(seconds) <= 10  # second short drop: retry 1 bounds


def test_server_unavailable_lifts_the_floor_but_stays_random():
    b = Backoff(Rng(8), base=1, cap=120, busy_floor=10)
    b.refused(3)
    ds = [b.next_delay() for _ in range(300)]
    assert min(ds) >= 10 and max(ds) <= 120
    assert len(set(round(d, 3) for d in ds[:20])) == 20  # not all at the floor
    # Equal jitter above the floor: 10 + [c/2, c], the ceiling limited to cap - floor.
    _in_upper_half(_draws(b, 0), 10, 15)
    _in_upper_half(_draws(b, 2), 10, 30)
    _in_upper_half(_draws(b, 9), 10, 120)


def test_retry_delays_are_equal_jitter_growing_from_the_first_window():
    b = Backoff(Rng(20), base=1, cap=120, first_window=5)
    for a, c in ((0, 5), (1, 10), (2, 20), (3, 40), (4, 80), (5, 120), (40, 120)):
        _in_upper_half(_draws(b, a), 0, c)
    assert b.attempt == 41  # each call counted one attempt


def test_base_sets_the_scale_when_the_first_window_is_smaller():
    for fw in (0, 0.5):
        b = Backoff(Rng(21), base=2, cap=120, first_window=fw)
        _in_upper_half(_draws(b, 0), 0, 2)
        _in_upper_half(_draws(b, 3), 0, 16)


def test_cap_limits_the_ceiling_but_not_below_the_first_window():
    b = Backoff(Rng(22), base=1, cap=30, first_window=5)
    _in_upper_half(_draws(b, 2), 0, 20)
    _in_upper_half(_draws(b, 3), 0, 30)
    _in_upper_half(_draws(b, 12), 0, 30)
    # A first window wider than the cap wins: retries never come denser than the first wave.
    b = Backoff(Rng(23), base=1, cap=10, first_window=20)
    _in_upper_half(_draws(b, 4), 0, 20)


def test_fleet_refused_for_20_s_meets_the_storm_targets():
    # 1000 devices dropped at once, every attempt refused for 20 s: the peak attempt rate
    # (100 ms bins) stays <= 3 * N / first_window, each device fails at most 4 times
    # while refused and is back within first_window + half the outage of the reopening.
    n, fw, refusal = 1000, 5.0, 20.0
    bins = {}
    worst_tries = worst_back = 0
    for i in range(n):
        b = Backoff(Rng(1000 + i), first_window=fw)
        t = b.dropped(3600)  # a long-lived connection: the first attempt in the first window
        tries = 0
        while True:
            k = int(t * 10)
            bins[k] = bins.get(k, 0) + 1
            if t >= refusal:
                break
            tries += 1
            t += b.next_delay(t)
        worst_tries = max(worst_tries, tries)
        worst_back = max(worst_back, t - refusal)
    peak = max(bins.values()) * 10
    assert peak <= 3 * n / fw, peak
    assert worst_tries <= 4, worst_tries
    assert worst_back <= fw + refusal / 2, worst_back


def test_time_offline_bounds_the_ceiling_so_a_short_outage_ends_soon():
    b = Backoff(Rng(24), base=1, cap=120, first_window=5)
    # Without a time bound attempt 5 may wait up to 120 s; 10 s offline: 2.5 + 5.
    _in_upper_half(_draws(b, 5), 0, 120)
    ds = []
    for _ in range(200):
        b.attempt = 5
        ds.append(b.next_delay(10.0))
    _in_upper_half(ds, 0, 7.5)
    # Never below the first window, and the count still rules early on.
    b.attempt = 0
    assert 3.75 <= b.next_delay(0.0) <= 5
    b.attempt = 1
    ds = []
    for _ in range(200):
        b.attempt = 1
        ds.append(b.next_delay(100.0))
    _in_upper_half(ds, 0, 10)


def test_overload_reasons_lift_the_floor_and_grow_with_all_the_time_offline():
    for rc in (0x89, 0x97, 0x9F):
        b = Backoff(Rng(25), base=1, cap=120, first_window=5, busy_floor=10)
        b.refused(rc)
        assert b.busy and not b.hard and b.floor == 10
        ds = []
        for _ in range(200):
            b.attempt = 5
            ds.append(b.next_delay(20.0))
        _in_upper_half(ds, 10, 10 + 22.5)
        b.dropped(3600)  # a stable connection forgets the overload
        assert not b.busy and b.floor == 0
    # "Server unavailable" (3.1.1 and 5) lifts the floor only; credentials go hard.
    b = Backoff(Rng(26), busy_floor=10)
    b.refused(0x88)
    assert b.floor == 10 and not b.busy and not b.hard
    for rc in (0x86, 0x87, 0x8A, 4, 5):
        b = Backoff(Rng(27))
        b.refused(rc)
        assert b.hard
    b = Backoff(Rng(28))
    b.refused(0x9C)  # a redirect nobody followed: an ordinary failed attempt
    assert not b.hard and not b.busy and b.floor == 0


def test_fixed_delay_has_the_backoff_interface_and_never_varies():
    f = Fixed(2.0)
    assert f.first_delay() == 2.0
    assert [f.next_delay() for _ in range(50)] == [2.0] * 50
    f.refused(3)
    f.refused(5)  # no floor, no hard mode: the fixed-retry client ignores the return code
    assert f.next_delay() == 2.0 and not f.hard and f.floor == 0
    assert f.dropped(1) == 2.0 and f.dropped(3600) == 2.0
    assert f.attempt == 51 and f.flap_s > 0 and f.stable_s > 0
    # The app sets the live reconnect settings on every backoff: harmless here.
    f.base, f.cap, f.first_window = 1.0, 120.0, 5.0
    assert f.next_delay() == 2.0


def test_bad_credentials_back_off_hard_within_floor_and_cap():
    for rc in (4, 5, 2):
        b = Backoff(Rng(9 + rc))
        b.next_delay()
        b.refused(rc)
        assert b.hard
        ds = [b.next_delay() for _ in range(300)]
        assert min(ds) >= 60 and max(ds) <= 1800, (rc, min(ds), max(ds))
        assert ds[0] <= 120  # the hard window starts at 60..120 and grows from there
        assert max(ds[-100:]) > 1500  # and reaches towards the 30 min cap
    b.dropped(30)  # a stable connection ends the penalty
    assert not b.hard and b.floor == 0 and b.attempt == 0


def test_repeated_flaps_back_off_hard():
    b = Backoff(Rng(12), flap_s=10, flap_limit=3)
    b.dropped(2)
    b.dropped(3)
    assert not b.hard
    b.dropped(20)  # a longer connection in between breaks the run
    b.dropped(1)
    b.dropped(1)
    assert not b.hard
    d = b.dropped(1)
    assert b.hard and 60 <= d <= 1800


def test_first_delay_within_first_window():
    b = Backoff(Rng(5), first_window=5)
    ds = [b.first_delay() for _ in range(500)]
    assert 0 <= min(ds) < 0.5 and 4.5 < max(ds) <= 5


def test_jittered_period():
    r = Rng(6)
    ps = [jittered(100, r) for _ in range(500)]
    assert 50 <= min(ps) < 55 and 145 < max(ps) <= 150


def test_small_seeds_do_not_give_small_first_values():
    firsts = [Rng(seed).random() for seed in range(1, 65)]
    assert sum(firsts) / len(firsts) > 0.3, firsts
    assert max(firsts) > 0.8


def _xorshift32(seed, n):
    """The reference: xorshift32 on whole 32-bit words, as Rng was first written."""
    s = ((seed * 2654435761) & 0xFFFFFFFF) or 0x9E3779B9
    out = []
    for i in range(8 + n):
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        if i >= 8:
            out.append(s)
    return out


def test_rng_in_halves_is_xorshift32():
    for seed in (0, 1, 5, 12345, 0x80000007, 0xFFFFFFFF):
        ref = _xorshift32(seed, 300)
        r = Rng(seed)
        assert [r.u32() for _ in range(300)] == ref, seed
        r = Rng(seed)
        assert [r.random() for _ in range(300)] == [x / 4294967296.0 for x in ref], seed


def test_a_draw_allocates_no_big_int():
    # On a 32-bit port (the board-model build) a whole-word xorshift made ~250 bytes of
    # big-int garbage per draw; what is left is the float of the result. On the 64-bit
    # port small ints reach 2^62, so only the board-model run can catch a regression.
    import gc

    r = Rng(7)
    r.random()
    gc.collect()
    gc.disable()
    try:
        before = gc.mem_alloc()
        for _ in range(100):
            r.random()
        per_draw = (gc.mem_alloc() - before) / 100
    finally:
        gc.enable()
    assert per_draw < 100, per_draw
