# Outbox benchmark, run inside the Unix port by bench/run.py: enqueue rates (RAM, flash),
# drain rate through mosquitto, flash bytes and erases per message, recovery time of a
# full queue, heap. 64-byte payloads on the device's real telemetry topic length. Also one
# simulated hour offline at the default telemetry rate (offline_hour). Prints one JSON line
# of figures.
import gc

gc.collect()
_heap0 = gc.mem_alloc()

import sys

_root = sys.path[0].rsplit("/", 1)[0]
sys.path.append(_root + "/lib")
sys.path.append(_root)

import asyncio
import json
import os
import time

from outbox.outbox import Outbox


class Clock:
    t = 0

    def ms(self):
        return self.t


_ob = Outbox(None, ticks_ms=Clock().ms, ticks_diff=time.ticks_diff)
gc.collect()
QUEUE_HEAP = gc.mem_alloc() - _heap0
del _ob

from firmware.boards.unix import open_flash  # noqa: E402
from mqtt.client import MQTTClient  # noqa: E402

HOST = sys.argv[1]
PORT = int(sys.argv[2])
N = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
TOPIC = b"devices/pump-0042/telemetry"
PAYLOAD = b"x" * 64
IMAGE = "/tmp/outbox-bench-%s.img" % "".join("%02x" % b for b in os.urandom(4))


def fresh():
    try:
        os.remove(IMAGE)
    except OSError:
        pass
    return open_flash(IMAGE, 1048576)


def outbox(fs, clock, **kw):
    ob = Outbox(fs, ticks_ms=clock.ms, ticks_diff=time.ticks_diff, topic=TOPIC, **kw)
    ob.recover()
    return ob


def rate(n, t0):
    return n * 1e6 / time.ticks_diff(time.ticks_us(), t0)


def wear(policy, n):
    """Flash bytes per payload byte and erases per 1000 messages for n messages put during
    an outage (link down; a tick every 20 messages, as 250 ms ticks at 80 msg/s)."""
    bdev, fs = fresh()
    clock = Clock()
    ob = outbox(fs, clock, policy=policy)
    w0, e0 = bdev.bytes_written, bdev.erases
    t0 = time.ticks_us()
    for i in range(n):
        ob.put(TOPIC, PAYLOAD, 1, i + 1)
        if i % 20 == 19:
            clock.t += 250
            ob.tick(False)
    ob.spill()
    r = rate(n, t0)
    kept = len(ob)
    return ((bdev.bytes_written - w0) / (kept * len(PAYLOAD)),
            (bdev.erases - e0) * 1000 / kept, r)


async def drain_rate(n):
    bdev, fs = fresh()
    clock = Clock()
    ob = outbox(fs, clock, flash_bytes=1048576 // 2)
    for i in range(n):
        ob.put(TOPIC, PAYLOAD, 1, i + 1)
    ob.spill()  # the backlog of an outage: on flash, oldest first
    c = MQTTClient("bench-outbox", HOST, PORT, clean=True, log=lambda l, m: None,
                   on_ack=lambda m: ob.ack(m.token))
    task = asyncio.create_task(c.run())
    await c.connected.wait()
    t0 = time.ticks_us()
    while True:
        await c.room()
        rec = ob.next()
        if rec is None:
            break
        ob.handed_over()
        await c.publish(rec[0], rec[1], 1, False, wait=False, token=rec[2])
    while len(ob):
        await asyncio.sleep_ms(1)
    r = rate(n, t0)
    await c.disconnect()
    task.cancel()
    return r


def recovery_ms():
    """A full default-size queue (256 KiB on flash) recovered by a fresh outbox."""
    bdev, fs = fresh()
    clock = Clock()
    ob = outbox(fs, clock)
    i = 0
    while ob.flash.nbytes + 8192 < ob.flash.capacity:
        for _ in range(64):
            i += 1
            ob.put(TOPIC, PAYLOAD, 1, i)
        ob.spill()
    bdev2, fs2 = open_flash(IMAGE, 1048576)
    ob2 = Outbox(fs2, ticks_ms=clock.ms, ticks_diff=time.ticks_diff, topic=TOPIC)
    t0 = time.ticks_us()
    n = ob2.recover()
    ms = time.ticks_diff(time.ticks_us(), t0) / 1000
    assert n == len(ob), (n, len(ob))
    return ms, n


# One hour offline at the device's defaults (firmware/settings.py, firmware/bootconfig.py):
# telemetry_interval 60 s; outbox policy "offline", spill_ms 1000, flash_bytes 262144,
# overflow "oldest" (segment and block: Outbox's defaults, which firmware/app.py keeps).
HOUR_MS = 3600000
INTERVAL_MS = 60000
TICK_MS = 250  # firmware/app.py _spill_loop
PHASE_MS = 17371  # the telemetry schedule's random phase: off the spill loop's 250 ms grid
WINDOW = 16  # the MQTT session's in-flight window (lib/mqtt/session.py)


class _Board:
    """What firmware/telemetry.py's payload() asks of a board, on the fake clock: a device
    up for a day and a half, its clock set (ts with ms, as on the Unix port and after NTP)."""

    def __init__(self, clock):
        self.clock = clock

    def uptime_ms(self):
        return 36 * 3600000 + self.clock.t

    def unix_time(self):
        return round(1717000000 + self.clock.t / 1000, 3)


def offline_hour(ram_bytes):
    """The flash bytes and erases of one hour with the link down, counted by the block
    device under littlefs (its metadata and copy-on-write included), for the device's real
    telemetry messages (firmware/telemetry.py's payload(), the Unix board's temp_c reading),
    one every 60 s, put as firmware/app.py _enqueue does and handed to the offline session
    by the drain up to its window; outbox.tick(False) every 250 ms as _spill_loop calls it.
    A fake clock: no sleeping. Returns (bytes, erases, records dict, payload bytes)."""
    import random

    from firmware.telemetry import Telemetry

    random.seed(42)
    bdev, fs = fresh()
    clock = Clock()
    ob = Outbox(fs, ram_bytes=ram_bytes, flash_bytes=262144, policy="offline",
                overflow="oldest", spill_ms=1000, ticks_ms=clock.ms,
                ticks_diff=time.ticks_diff, topic=TOPIC)
    ob.recover()  # creates /outbox: a device's flash has it already
    tel = Telemetry(_Board(clock), None, None, TOPIC, 7, INTERVAL_MS // 1000)
    w0, e0 = bdev.bytes_written, bdev.erases
    plen = 0
    put = 0
    most_in_ram = 0
    due = PHASE_MS
    tick = TICK_MS
    while tick <= HOUR_MS:
        if due < tick:
            clock.t = due
            payload = tel.payload({"temp_c": round(21.0 + random.uniform(-0.5, 0.5), 2)})
            plen += len(payload)
            ob.put(TOPIC, payload, tel.boot, tel.seq)
            put += 1
            most_in_ram = max(most_in_ram, ob.ring.count)
            # The drain (firmware/app.py _drain) hands records to the session while its
            # window has room, connected or not; they stay in the outbox until acked.
            while ob.inflight < WINDOW and ob.next() is not None:
                ob.handed_over()
            due += INTERVAL_MS
            continue
        clock.t = tick
        ob.tick(False)
        tick += TICK_MS
    records = {"put": put, "in_ram": ob.ring.count, "on_flash": ob.flash.count,
               "dropped": ob.stats["dropped"], "most_in_ram": most_in_ram}
    written, erased = bdev.bytes_written - w0, bdev.erases - e0
    # Measured nothing, or not what it claims: fail the run rather than print it.
    assert put == HOUR_MS // INTERVAL_MS and written > 0 and not ob.stats["flash_errors"], (
        put, written, ob.stats)
    assert records["in_ram"] + records["on_flash"] == put, records
    return written, erased, records, plen / put


def main():
    out = {}
    clock = Clock()
    out["queue_heap_bytes"] = QUEUE_HEAP
    big = outbox(None, clock, ram_bytes=N * 120)
    t0 = time.ticks_us()
    for i in range(N):
        big.put(TOPIC, PAYLOAD, 1, i + 1)
    out["queue_enqueue_ram_msg_s"] = rate(N, t0)
    del big
    gc.collect()
    bpp, erases, _ = wear("offline", min(N, 2500))  # fits the 256 KiB flash tier: no drops
    out["queue_flash_bytes_per_payload_byte"] = bpp
    out["queue_erases_per_1000_msgs"] = erases
    bpp_a, erases_a, r_always = wear("always", N // 5)
    out["queue_flash_bytes_per_payload_byte_always"] = bpp_a
    out["queue_erases_per_1000_msgs_always"] = erases_a
    out["queue_enqueue_flash_msg_s"] = r_always
    out["queue_drain_msg_s"] = asyncio.run(drain_rate(N))
    ms, n = recovery_ms()
    out["queue_recovery_full_ms"] = ms
    out["queue_recovery_full_records"] = n
    # The default ring (4096) against the former one (8192), at the default telemetry rate.
    hour_bytes, hour_erases, hour_records = {}, {}, {}
    for ram in (4096, 8192):
        w, e, rec, plen = offline_hour(ram)
        hour_bytes["ram_%d" % ram] = w
        hour_erases["ram_%d" % ram] = e
        hour_records["ram_%d" % ram] = rec
    out["outbox_flash_bytes_per_hour_offline"] = hour_bytes
    out["outbox_flash_erases_per_hour_offline"] = hour_erases
    out["outbox_offline_hour_records"] = hour_records
    out["outbox_offline_hour_payload_bytes"] = plen  # mean telemetry payload; record: +16
    try:
        os.remove(IMAGE)
    except OSError:
        pass
    for k in out:
        out[k] = round(out[k], 3) if isinstance(out[k], float) else out[k]
    print(json.dumps(out))


main()
