# Outbox benchmark, run inside the Unix port by bench/run.py: enqueue rates (RAM, flash),
# drain rate through mosquitto, flash bytes and erases per message, recovery time of a
# full queue, heap. 64-byte payloads on the device's real telemetry topic length. Prints
# one JSON line of figures.
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
    try:
        os.remove(IMAGE)
    except OSError:
        pass
    for k in out:
        out[k] = round(out[k], 3) if isinstance(out[k], float) else out[k]
    print(json.dumps(out))


main()
