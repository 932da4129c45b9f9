# Device object: config retry without crash-looping, boot counter, per-device random phase,
# and several devices in one process with nothing shared.
import asyncio
import json
import time

from firmware.bootlog import BootLog
from firmware.app import Device
from firmware.boards.unix import Board
from firmware.telemetry import Telemetry
from backoff import Rng
from firmware import bootconfig
from mpyutil import fresh_image


def _board(name):
    b = Board(fresh_image(name), 64 * 4096)
    b.lines = []
    b.log = b.lines.append
    return b


async def test_missing_config_logs_once_then_picks_up_the_file():
    b = _board("retry")
    d = Device(b, config_retry_s=0.02)
    task = asyncio.create_task(d.load_config())
    await asyncio.sleep(0.15)
    assert not task.done()
    errors = [l for l in b.lines if " E " in l]
    assert len(errors) == 1 and "/config.json missing" in errors[0], b.lines
    with b.fs.open("/config.json", "w") as f:
        f.write(json.dumps({"device_id": "late", "broker": {"host": "h"}}))
    for _ in range(50):
        if task.done():
            break
        await asyncio.sleep(0.02)
    assert task.done()
    assert (await task)["device_id"] == "late"


async def test_changed_error_is_logged_again():
    b = _board("retry2")
    d = Device(b, config_retry_s=0.02)
    task = asyncio.create_task(d.load_config())
    await asyncio.sleep(0.05)
    with b.fs.open("/config.json", "w") as f:
        f.write("{")
    await asyncio.sleep(0.1)
    task.cancel()
    errors = [l for l in b.lines if " E " in l]
    assert len(errors) == 2 and "not valid JSON" in errors[1], b.lines


def test_boot_counter_survives_a_restart_of_the_flash():
    path = fresh_image("boot")
    b = Board(path, 64 * 4096)
    assert BootLog(b.fs).start("power-on", 5)["boot"] == 1
    assert BootLog(b.fs).start("power-on", 5)["boot"] == 2
    b2 = Board(path)  # same image opened again, as after a power cycle
    assert BootLog(b2.fs).start("power-on", 5)["boot"] == 3


def test_boot_history_reports_cause_and_previous_uptime():
    b = _board("hist")
    log = BootLog(b.fs)
    r = log.start("power-on", 5)
    assert r["cause"] == "power-on" and r["prev_up_s"] is None and not r["safe"]
    log.save(75, stable=True)
    log.save(130)
    r = BootLog(b.fs).start("watchdog", 5)
    assert (r["boot"], r["cause"], r["prev_up_s"], r["streak"]) == (2, "watchdog", 130, 0)


def test_a_reset_the_firmware_asked_for_reports_its_own_reason():
    b = _board("pending")
    log = BootLog(b.fs)
    log.start("power-on", 5)
    log.save(3, pending="crash")
    # An RP2040 reports machine.reset() as a watchdog reset: the record knows better.
    assert BootLog(b.fs).start("watchdog", 5)["cause"] == "crash"
    log = BootLog(b.fs)
    log.start("soft", 5)
    log.save(4, pending="crash")
    # The power went after the crash was recorded: that is what happened last.
    assert BootLog(b.fs).start("power-on", 5)["cause"] == "power-on"
    assert BootLog(b.fs).start("bogus", 5)["cause"] == "unknown"


def test_short_boots_in_a_row_lead_to_safe_mode_and_a_stable_one_ends_the_run():
    b = _board("safe")
    seen = []
    for _ in range(7):
        r = BootLog(b.fs).start("watchdog", 3)  # each ends before it is marked stable
        seen.append((r["streak"], r["safe"]))
    assert seen == [(0, False), (1, False), (2, False), (3, True), (4, True), (5, True),
                    (6, True)], seen
    log = BootLog(b.fs)
    log.start("watchdog", 3)
    log.save(300, stable=True)  # safe mode ran its healthy period
    r = BootLog(b.fs).start("soft", 3)
    assert (r["streak"], r["safe"]) == (0, False)


def test_power_cuts_neither_count_towards_safe_mode_nor_end_a_crash_loop():
    # A solar board browning out at dusk: five short boots in a row, each ended by the power.
    b = _board("brownout")
    for _ in range(6):
        r = BootLog(b.fs).start("power-on", 3)
    assert (r["streak"], r["safe"]) == (0, False), r
    # Short boots the firmware may have caused count: a hang, a recorded crash, a panic.
    seen = []
    for cause in ("watchdog", "hard", "power-on", "deepsleep", "unknown"):
        r = BootLog(b.fs).start(cause, 3)
        seen.append((cause, r["streak"], r["safe"]))
    # The power cut in the middle of the crash loop does not end it either.
    assert seen == [("watchdog", 1, False), ("hard", 2, False), ("power-on", 2, False),
                    ("deepsleep", 2, False), ("unknown", 3, True)], seen
    log = BootLog(b.fs)
    log.start("power-on", 3)
    log.save(1, pending="crash")  # a crash recorded, then the power went: power-on wins
    r = BootLog(b.fs).start("power-on", 3)
    assert (r["cause"], r["streak"], r["safe"]) == ("power-on", 3, True), r


def test_a_record_from_older_firmware_or_a_corrupt_one_does_not_stop_the_boot():
    b = _board("oldrec")
    with b.fs.open("/boot.json", "w") as f:
        f.write('{"boot": 41}')
    r = BootLog(b.fs).start("power-on", 5)
    assert (r["boot"], r["streak"], r["safe"]) == (42, 0, False)
    with b.fs.open("/boot.json", "w") as f:
        f.write('{"boot": ')
    assert BootLog(b.fs).start("power-on", 5)["boot"] == 1


async def test_telemetry_reads_at_boot_then_at_a_random_phase_per_device():
    boot_reads = []
    firsts = []
    b = _board("phase")
    t0 = time.ticks_ms()  # after the board: making its flash takes long on a board's own

    def recorder():
        def pub(topic, payload, boot, seq):
            at = (time.ticks_diff(time.ticks_ms(), t0), json.loads(payload))
            if seq == 1:
                boot_reads.append(at)
                return
            firsts.append(at)
            raise asyncio.CancelledError
        return pub

    tasks = [
        asyncio.create_task(Telemetry(b, Rng(seed), recorder(), "t", 1, 0.4).run())
        for seed in (11, 22, 33, 44)
    ]
    await asyncio.sleep(0.5)
    for t in tasks:
        t.cancel()
    assert len(boot_reads) == 4 and all(ms < 50 for ms, _ in boot_reads), boot_reads
    assert len(firsts) == 4
    phases = sorted(ms for ms, _ in firsts)
    assert phases[0] >= 0 and phases[-1] <= 450
    assert phases[-1] - phases[0] > 40, phases  # not all at once
    assert all(m["seq"] == 2 and m["v"] == 1 and "up" in m and "ts" in m for _, m in firsts)


def test_two_devices_share_nothing():
    d1, d2 = Device(_board("a")), Device(_board("b"))
    d1.build(bootconfig.validate({"device_id": "one", "broker": {"host": "h", "port": 1}}))
    d2.build(bootconfig.validate({"device_id": "two", "prefix": "p", "broker": {"host": "h"}}))
    assert d1.topics.telemetry == "devices/one/telemetry"
    assert d2.topics.telemetry == "p/devices/two/telemetry"
    assert d1.client.session is not d2.client.session
    assert d1.rnd.u32() != d2.rnd.u32()
    assert d1.client.will[0] == "devices/one/status"


def test_baseline_profile_retries_fixed_with_a_clean_session_and_says_so():
    from backoff import Backoff, Fixed

    std, base = Device(_board("std")), Device(_board("base"))
    std.build(bootconfig.validate({"device_id": "s", "broker": {"host": "h"}}))
    base.build(bootconfig.validate({"device_id": "b", "profile": "baseline",
                                    "broker": {"host": "h"}}))
    assert isinstance(std.client.backoff, Backoff) and not std.client.clean
    assert isinstance(base.client.backoff, Fixed) and base.client.clean
    assert base.client.backoff.next_delay() == 2.0
    assert "profile" not in json.loads(std._status("online"))
    assert json.loads(base._status("online"))["profile"] == "baseline"
    for d in (std, base):
        d.bootrec = {"boot": 1, "cause": "power"}
        d._log_boot(d.cfg)
    assert not [x for x in std.board.lines if "baseline" in x]
    assert len([x for x in base.board.lines if " W baseline profile" in x]) == 1


def test_log_ring_keeps_the_last_lines_in_memory_fixed_at_boot():
    import gc
    from firmware.health import LogRing

    r = LogRing(28, 12)  # bytes: four 6-byte lines and their length bytes
    assert r.last(3) == []
    for i in range(6):
        r.add("line %d" % i)
    assert r.last(10) == ["line 2", "line 3", "line 4", "line 5"]
    assert r.last(2) == ["line 4", "line 5"]
    r.add("x" * 30)
    r.add("abcdefghij\u20ac")  # 13 bytes: the 3-byte euro sign would be split at 12
    assert r.last(2) == ["x" * 12, "abcdefghij"], r.last(2)
    # Lines of many lengths wrap around the buffer's end at every offset: the ring always
    # holds the newest lines that fit, whole and in order.
    w = LogRing(50, 20)
    kept = []
    for i in range(300):
        line = "%d:" % i + "ab\u00e9"[: i % 3] * (i % 7)
        w.add(line)
        b = line.encode()
        n = min(20, len(b))
        while n < len(b) and b[n] & 0xC0 == 0x80:  # a cut leaves whole characters
            n -= 1
        kept.append(b[:n].decode())
        while sum(len(x.encode()) + 1 for x in kept) > 50:
            kept.pop(0)
        assert w.last(100) == kept, (i, w.last(100), kept)
        assert w.last(2) == kept[-2:]
    big = LogRing()
    gc.collect()
    before = gc.mem_alloc()
    for i in range(200):
        big.add("pump-0042 I connected (session present: 1, resent: %d, sent: %d)" % (i, i))
    gc.collect()
    assert gc.mem_alloc() - before < 256, gc.mem_alloc() - before


def test_room_reserved_at_start_up_is_released_for_the_boot_buffers():
    import gc

    b = _board("reserve")
    d = Device(b)
    d.heap_reserve = [bytearray(12288)]
    gc.collect()
    before = gc.mem_alloc()
    d.build(bootconfig.validate({"device_id": "res", "broker": {"host": "h"}}))
    assert d.heap_reserve == []
    gc.collect()
    # The 8 KB ring and the rest of the build came out of the 12 KB given back.
    assert gc.mem_alloc() - before < 12288, gc.mem_alloc() - before
    d.heap_reserve = None  # no reservation (a second device in the process): nothing to do
    d.build(bootconfig.validate({"device_id": "res2", "broker": {"host": "h"}}))


async def test_the_update_agent_is_let_go_once_idle_and_loaded_again_for_a_request():
    import sys

    from firmware.supervisor import Supervisor
    from firmware.version import BUNDLE_VERSION

    b = _board("idle-ota")
    b.ota_root = ""  # a board that can be updated
    d = Device(b)
    d.build(bootconfig.validate({"device_id": "upd", "broker": {"host": "h"}}))
    assert d.ota is not None and "firmware.ota" in sys.modules
    await d._ota_task()  # nothing on trial, nothing requested: it reports and ends
    assert d.ota is None and d._ota_text is not None
    assert [m for m in ("firmware.ota", "firmware.otahttp", "firmware.otacheck", "otaboot")
            if m in sys.modules] == []
    assert json.loads(d._ota_text)["state"] == "idle"
    # A request loads it again under the supervisor; asked for the running version, it
    # reports it confirmed and is let go again.
    d.sup = Supervisor(b, d.log, d.rnd, 8000, None)
    eff = dict(d.sync.twin.effective())
    eff["ota"] = {"version": BUNDLE_VERSION, "manifest_sha256": "0" * 64, "window_s": 0,
                  "reboot": "now", "downgrade": False, "url": "http://h/m.json"}
    d._apply(["ota"], eff)
    assert d.ota is not None and d.ota.want is eff["ota"]
    await asyncio.wait_for(d.sup.tasks["ota"].task, 5)
    assert d.ota is None and "firmware.ota" not in sys.modules
    assert json.loads(d._ota_text)["state"] == "confirmed", d._ota_text
