# Jitter and backoff: bounds, cap before randomising, per-instance randomness.
from backoff import Backoff, Rng, full_jitter, jittered


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


def test_server_unavailable_lifts_the_floor_but_stays_random():
    b = Backoff(Rng(8), base=1, cap=120, busy_floor=10)
    b.refused(3)
    ds = [b.next_delay() for _ in range(300)]
    assert min(ds) >= 10 and max(ds) <= 120
    assert len(set(round(d, 3) for d in ds[:20])) == 20  # not all at the floor


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
