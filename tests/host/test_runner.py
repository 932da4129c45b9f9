"""The runner (testbed/devices.py) as a board's hardware: a watchdog that resets a board that
hangs but not one whose shared host process is busy with other boards, and a power supply
that brings a dead process back after a power cut, a crash or a kill from outside."""
import os
import signal

import pytest

from testbed.devices import Spec

FAST = {"keepalive": 5, "reconnect": {"first_window": 0.5, "base": 0.2, "cap": 1}}
BOOT_S = 60  # a boot and its connect, on a host that may be busy with other work


def _board(fleet, tmp_path, dev, **over):
    ctl = tmp_path / (dev + ".ctl")
    ctl.write_text("")
    over.setdefault("telemetry_interval", 0.2)
    over.setdefault("watchdog_ms", 1500)
    cfg = fleet.config(dev, broker=FAST, **over)
    return Spec(str(tmp_path / (dev + ".img")), config=cfg, control=str(ctl)), ctl


def _online(observer, dev, boot):
    return [s for s in observer.json("devices/%s/status" % dev)
            if s["state"] == "online" and s["boot"] == boot]


def _seqs(observer, dev, boot=1):
    return {m["seq"] for m in observer.json("devices/%s/telemetry" % dev) if m["boot"] == boot}


def _two_boards(fleet, observer, tmp_path, over=None, a_over=None, a_ctl="", **kw):
    over = over or {}
    a, actl = _board(fleet, tmp_path, "ra", **dict(over, **(a_over or {})))
    actl.write_text(a_ctl)
    b, _ = _board(fleet, tmp_path, "rb", **over)
    p = fleet.start(a, b, **kw)
    for dev in ("ra", "rb"):
        observer.wait(lambda m, d=dev: _online(observer, d, 1), BOOT_S, dev + " online")
    return p, a, actl


@pytest.mark.parametrize("when", ["running", "boot"])
def test_a_shared_process_busy_longer_than_the_timeout_is_not_a_hang(
        when, fleet, observer, tmp_path):
    # Each of ra's readings (every 4 s) holds the whole process for 4 s, longer than both
    # boards' 3 s watchdog: as a process busy booting or serving 250 boards does. Without
    # the loop's ticks the runner would reset the process at the first hold. At boot the
    # first hold comes before the loop's first tick, as the boot of 249 more boards would.
    # (The supervisors may skip a feed right after a hold, until every task has checked in.)
    hold = "host-busy=4000"
    p, _, ctl = _two_boards(fleet, observer, tmp_path, over={"watchdog_ms": 3000},
                            a_over={"telemetry_interval": 4},
                            a_ctl=hold if when == "boot" else "")
    ctl.write_text(hold)
    p.wait_line(r"ra\.img host busy for 4000 ms", 60, count=3)
    ctl.write_text("")
    # Both boards go on in the same boot, their telemetry after the holds arriving.
    for dev in ("ra", "rb"):
        n = len(_seqs(observer, dev))
        observer.wait(lambda m, d=dev, n=n: len(_seqs(observer, d)) >= n + 3, BOOT_S,
                      dev + " telemetry after the holds")
    assert p.resets == [], p.output()[-3000:]
    assert not _online(observer, "ra", 2) and not _online(observer, "rb", 2)


def test_a_board_that_hangs_in_a_busy_shared_process_is_still_reset(
        fleet, observer, tmp_path):
    # The loop runs (its ticks say it is not late), but ra's telemetry task is stuck: the
    # supervisor stops feeding and the runner resets, as it would a process of one board.
    p, a, ctl = _two_boards(fleet, observer, tmp_path,
                            on_watchdog=lambda image: ctl.write_text(""))
    ctl.write_text("hang-await")
    p.wait_line(r"runner: watchdog reset of .*ra\.img after", 30)
    assert p.resets == [a.image] and "loop stopped" not in p.output()
    observer.wait(lambda m: _online(observer, "ra", 2) and _online(observer, "rb", 2), BOOT_S,
                  "both boards' boot 2 online")
    assert _online(observer, "ra", 2)[0]["cause"] == "watchdog"
    assert _online(observer, "rb", 2)[0]["cause"] == "power-on"


def test_a_shared_process_whose_loop_stops_is_reset_after_host_hang_s(
        fleet, observer, tmp_path):
    # A busy loop in one board stops every board of the process: no tick says how long, so
    # after host_hang_s the process counts as hung.
    p, a, ctl = _two_boards(fleet, observer, tmp_path, host_hang_s=4,
                            on_watchdog=lambda image: ctl.write_text(""))
    ctl.write_text("hang-busy")
    line = p.wait_line(r"runner: watchdog reset of .*\.img after", 30)[0]
    assert "the process's loop stopped for" in line, line
    observer.wait(lambda m: _online(observer, "ra", 2) and _online(observer, "rb", 2), BOOT_S,
                  "both boards back")


def test_a_power_cut_ends_in_a_power_on_boot_with_the_queue_intact(fleet, observer, tmp_path):
    spec, _ = _board(fleet, tmp_path, "pc1")
    p = fleet.start(spec, restart=True, off_s=(0.2, 0.4))
    observer.wait(lambda m: len(_seqs(observer, "pc1")) >= 3, BOOT_S, "telemetry")
    assert p.power_cut()
    observer.wait(lambda m: _online(observer, "pc1", 2), BOOT_S, "boot 2 online")
    assert _online(observer, "pc1", 2)[0]["cause"] == "power-on"
    assert (p.power_cuts, p.restarts, p.exits, p.resets) == (1, 1, [], [])
    assert not p.down()
    seqs = _seqs(observer, "pc1")
    assert seqs == set(range(1, max(seqs) + 1)), "no hole in the cut boot's telemetry"


def test_a_process_killed_from_outside_is_powered_up_again(fleet, observer, tmp_path):
    spec, _ = _board(fleet, tmp_path, "pc2")
    p = fleet.start(spec, restart=True, off_s=(0.2, 0.4))
    observer.wait(lambda m: _online(observer, "pc2", 1), BOOT_S, "online")
    os.kill(p.proc.pid, signal.SIGKILL)
    observer.wait(lambda m: _online(observer, "pc2", 2), BOOT_S, "boot 2 online")
    assert p.exits == [-signal.SIGKILL] and p.restarts == 1 and p.power_cuts == 0
    p.wait_line(r"runner: process exited \(rc -9\)")


def test_without_restart_a_killed_process_stays_down(fleet, observer, tmp_path):
    spec, _ = _board(fleet, tmp_path, "pc3")
    p = fleet.start(spec)
    observer.wait(lambda m: _online(observer, "pc3", 1), BOOT_S, "online")
    os.kill(p.proc.pid, signal.SIGKILL)
    p.wait_line(r"runner: process exited \(rc -9\)")
    assert p.down() and p.restarts == 0
