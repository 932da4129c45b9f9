# Supervisor and link supervision on the Unix port: restarts with backoff, a critical task
# that keeps dying resets, missed check-ins stop the watchdog feeding; the link is joined in
# priority order, a loss is noticed and reported, and the join is retried.
import asyncio
import time

from backoff import Backoff, Rng
from firmware import supervisor as supmod
from firmware.boards.base import BaseBoard
from firmware.clock import EmulatedTicks
from firmware.supervisor import Supervisor
from firmware.wifi import LinkSupervisor


class FakeBoard(BaseBoard):
    """A board's ticks (period 2^30) starting 300 ms before a wrap, so that every test here
    crosses one; `shift` drives them forward (days in an instant)."""

    def __init__(self, before_wrap_ms=300):
        self.feeds = 0
        self.armed = []
        self.shift = 0
        t = EmulatedTicks(time.ticks_ms, before_wrap_ms, lambda: self.shift)
        self.ticks_ms, self.ticks_diff, self.ticks_add = t.now, t.diff, t.add
        self.start_uptime()

    def arm_watchdog(self, ms):
        self.armed.append(ms)

    def feed_watchdog(self):
        self.feeds += 1


def _sup(wdt_ms=400, grace_ms=None):
    lines = []
    fatal = []

    async def on_fatal(reason):
        fatal.append(reason)

    s = Supervisor(FakeBoard(), lambda lv, m: lines.append(lv + " " + m), Rng(5), wdt_ms,
                   on_fatal, grace_ms)
    return s, lines, fatal


async def test_a_task_that_dies_is_restarted_and_counted():
    s, lines, fatal = _sup()
    runs = []

    async def flaky():
        runs.append(1)
        if len(runs) < 3:
            raise ValueError("boom")
        await asyncio.sleep(10)

    old = supmod.RESTART_BASE_MS
    supmod.RESTART_BASE_MS = 10
    try:
        s.spawn("flaky", flaky, critical=False)
        await asyncio.sleep(0.3)
    finally:
        supmod.RESTART_BASE_MS = old
    assert len(runs) == 3, runs
    assert s.restarts() == {"flaky": 2} and s.stats["restarts"] == 2
    assert not fatal
    assert sum(1 for l in lines if l.startswith("E task flaky died")) == 2, lines
    s.cancel_all()


async def test_a_critical_task_that_keeps_dying_resets_the_board():
    s, lines, fatal = _sup()

    async def broken():
        raise RuntimeError("always")

    old = supmod.RESTART_BASE_MS
    supmod.RESTART_BASE_MS = 5
    try:
        s.spawn("core", broken)
        await asyncio.sleep(0.4)
    finally:
        supmod.RESTART_BASE_MS = old
    assert fatal == ["task core keeps dying"], (fatal, lines)
    assert s.restarts() == {"core": supmod.DEATH_LIMIT}
    s.cancel_all()


async def test_feeding_stops_while_a_task_misses_its_check_in_and_resumes_after():
    s, lines, fatal = _sup(wdt_ms=80, grace_ms=0)
    beat = [True]

    async def worker():
        while True:
            if beat[0]:
                s.beat("w", 30)
            await asyncio.sleep_ms(10)

    s.spawn("w", worker, within_ms=30)
    dog = asyncio.create_task(s.watchdog())
    await asyncio.sleep_ms(200)
    fed = s.board.feeds
    assert fed >= 5, fed
    beat[0] = False  # stuck: alive, but no longer checking in
    await asyncio.sleep_ms(300)
    starved = s.board.feeds
    assert starved - fed <= 2, (fed, starved)
    assert s.stats["starved"] == 1
    assert any("task w missed its check-in" in l for l in lines), lines
    beat[0] = True
    await asyncio.sleep_ms(200)
    assert s.board.feeds >= starved + 5
    assert s.board.armed == [80]
    dog.cancel()
    s.cancel_all()


async def test_an_idle_task_promises_nothing_and_does_not_starve_the_watchdog():
    s, lines, fatal = _sup(wdt_ms=80, grace_ms=0)

    async def waiter():
        s.beat("idle", None)  # waiting for another task, on purpose
        await asyncio.sleep(10)

    s.spawn("idle", waiter, within_ms=0)
    dog = asyncio.create_task(s.watchdog())
    await asyncio.sleep_ms(250)
    assert s.overdue() is None and s.board.feeds >= 10
    dog.cancel()
    s.cancel_all()


async def test_a_fire_and_forget_failure_is_counted_not_lost():
    s, lines, fatal = _sup()

    async def bad():
        raise KeyError("x")

    s.fire(bad(), "birth message")
    await asyncio.sleep_ms(20)
    assert s.stats["unhandled"] == 1
    assert any("unhandled error in birth message" in l for l in lines), lines


class FakeLink:
    def __init__(self, reachable):
        self.reachable = reachable  # ssids that can be joined
        self.tried = []
        self.joined = None

    def connect(self, ssid, password):
        self.tried.append(ssid)
        self.joined = ssid if ssid in self.reachable else None

    def isconnected(self):
        return self.joined is not None and self.joined in self.reachable

    def disconnect(self):
        self.joined = None

    def rssi(self):
        return -60


def _link(reachable, nets):
    lines = []
    down = []
    fl = FakeLink(reachable)
    bo = Backoff(Rng(9), base=0.05, cap=0.1, first_window=0.05, stable_s=30, flap_limit=1000)
    ls = LinkSupervisor(fl, nets, bo, lambda lv, m: lines.append(lv + " " + m),
                        FakeBoard().uptime_s,
                        on_down=lambda: down.append(1), join_timeout_ms=300)
    return ls, fl, lines, down


async def test_link_joins_networks_in_priority_order():
    ls, fl, lines, down = _link({"site-b"}, [("site-a", "x"), ("site-b", "y")])
    t = asyncio.create_task(ls.run())
    await asyncio.wait_for(ls.up.wait(), 2)
    assert fl.tried == ["site-a", "site-b"] and ls.ssid == "site-b"
    assert ls.stats["joins"] == 1
    t.cancel()


async def test_link_loss_is_noticed_reported_and_the_link_joined_again():
    ls, fl, lines, down = _link({"a"}, [("a", "")])
    t = asyncio.create_task(ls.run())
    await asyncio.wait_for(ls.up.wait(), 2)
    fl.reachable = set()  # the access point goes
    await asyncio.sleep(1.3)
    assert not ls.up.is_set() and down == [1] and ls.stats["losses"] == 1
    assert any("link to a lost" in l for l in lines), lines
    await asyncio.sleep(0.8)
    assert ls.stats["join_failures"] >= 1  # retried, with backoff, while it is gone
    fl.reachable = {"a"}
    await asyncio.wait_for(ls.up.wait(), 3)
    assert ls.stats["joins"] == 2
    t.cancel()


async def test_deaths_days_apart_are_not_a_crash_loop_after_the_ticks_wrap():
    # Three deaths a week apart: each its own window. Measured in ticks, as it once was,
    # a week is more than ticks_diff spans (6.2 days) and came out negative: "recent".
    s, lines, fatal = _sup()
    runs = []

    async def rare():
        runs.append(1)
        if len(runs) <= 3:
            for _ in range(2):  # 2 x 3.1 days later, and a bit
                s.board.shift += (1 << 28) + 1000
                s.board.uptime_s()  # as the watchdog loop's regular look would
            raise ValueError("once in a while")
        await asyncio.sleep(10)

    old = supmod.RESTART_BASE_MS
    supmod.RESTART_BASE_MS = 10
    try:
        s.spawn("rare", rare)
        for _ in range(100):
            if len(runs) > 3:
                break
            await asyncio.sleep_ms(20)
    finally:
        supmod.RESTART_BASE_MS = old
    assert len(runs) == 4 and not fatal, (runs, fatal, lines)
    assert s.board.uptime_s() >= 6 * (1 << 28) // 1000
    s.cancel_all()


async def test_a_stalled_loop_is_not_a_missed_check_in():
    # The whole loop stood still for 3 days of ticks (the Unix board's driven clock; on a
    # board, a stall past the timeout is the hardware watchdog's): no task could check in
    # meanwhile, so none is late for it. A task stuck afterwards still is.
    s, lines, fatal = _sup(wdt_ms=80, grace_ms=0)
    beat = [True]
    jump = [False]

    async def worker():
        while True:
            if beat[0]:
                s.beat("w", 60)
            if jump[0]:
                jump[0] = False
                s.board.shift += 1 << 28  # the watchdog looks before the next beat
            await asyncio.sleep_ms(50)

    s.spawn("w", worker, within_ms=60)
    dog = asyncio.create_task(s.watchdog())
    await asyncio.sleep_ms(100)
    jump[0] = True
    fed = s.board.feeds
    await asyncio.sleep_ms(200)
    assert not jump[0] and s.stats["starved"] == 0, (s.stats, lines)
    assert s.board.feeds >= fed + 5
    beat[0] = False
    await asyncio.sleep_ms(300)
    assert s.stats["starved"] == 1, (s.stats, lines)
    dog.cancel()
    s.cancel_all()
