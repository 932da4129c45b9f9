# MQTT client benchmark, run inside the Unix port by bench/run.py against a local mosquitto:
# QoS 0 / pipelined QoS 1 / window-1 / awaited QoS 1 rates, PUBACK latency, client heap,
# with MQTT 5 (what the firmware speaks to mosquitto) and the QoS 0 / pipelined QoS 1 rates
# again with 3.1.1 (`_311`); the bytes a telemetry message takes on the wire in each.
# Prints one JSON line of figures.
#
# Every rate counts messages the broker has taken: QoS 1 until the last PUBACK, QoS 0 until
# a QoS 1 message sent after the burst is acknowledged (the broker handles a connection's
# packets in order, so that PUBACK means every QoS 0 message before it was read). The rate
# at which QoS 0 merely fills the kernel's socket buffer is reported apart, as
# qos0_pushed_msg_s. Each rate is the median of three runs.
import gc

gc.collect()
_heap0 = gc.mem_alloc()

import sys

sys.path.append(sys.path[0].rsplit("/", 1)[0] + "/lib")

import asyncio
import json
import time

from mqtt import codec
from mqtt.client import MQTTClient

gc.collect()
_heap_code = gc.mem_alloc()

HOST = sys.argv[1]
PORT = int(sys.argv[2])
N = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
PAYLOAD = b"x" * 64
TOPIC = b"bench/t"


def quiet(level, msg):
    pass


# A telemetry message as the firmware builds it (firmware/telemetry.py) and its topic.
TEL_TOPIC = b"devices/sim-0001/telemetry"
TEL = b'{"seq": 1234, "ts": 1796477143.123, "temp_c": 20.87, "boot": 3, "up": 864000123, "v": 1}'


async def connected(cid, window=16, protocol="5"):
    c = MQTTClient(cid, HOST, PORT, keepalive=60, clean=True, window=window, log=quiet,
                   protocol=protocol)
    c.alias(TOPIC)
    c.alias(TEL_TOPIC)
    task = asyncio.create_task(c.run())
    await c.connected.wait()
    return c, task


async def drain(c):
    while len(c.session):
        await asyncio.sleep_ms(1)


async def rate(c, n, qos):
    """(delivered msg/s, pushed msg/s)"""
    t0 = time.ticks_us()
    for _ in range(n):
        await c.publish(TOPIC, PAYLOAD, qos, False, wait=False)
    t1 = time.ticks_us()
    if qos == 0:
        await c.publish(TOPIC, PAYLOAD, 1, False, wait=True)  # barrier, see header
    await drain(c)
    t2 = time.ticks_us()
    return n * 1e6 / time.ticks_diff(t2, t0), n * 1e6 / time.ticks_diff(t1, t0)


def wire_bytes(c):
    """Bytes of the second telemetry PUBLISH (QoS 1) on c's connection, as the client encodes
    it: with 5 the first one established the topic alias."""
    n = 0
    for _ in range(2):
        w = c._writer
        sizes = []
        c._writer = _Count(sizes)
        c._send_publish(TEL_TOPIC, TEL, 1, False, False, 1)
        c._writer = w
        n = sizes[0]
    return n


class _Count:
    """Stands in for the connection's stream for one write: keeps the packet's size."""

    out_buf = b""

    def __init__(self, sizes):
        self.sizes = sizes

    def write(self, pkt):
        self.sizes.append(len(pkt))


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


async def main():
    out = {}
    c, task = await connected("bench-a")
    gc.collect()
    total = gc.mem_alloc() - _heap0
    out["client_heap_bytes"] = total
    out["client_code_bytes"] = _heap_code - _heap0
    out["client_state_bytes"] = total - out["client_code_bytes"]
    q0, q0p, q1 = [], [], []
    for _ in range(3):
        d, p = await rate(c, N, 0)
        q0.append(d)
        q0p.append(p)
        q1.append((await rate(c, N, 1))[0])
    out["qos0_msg_s"] = median(q0)
    out["qos0_pushed_msg_s"] = median(q0p)
    out["qos1_pipelined_msg_s"] = median(q1)
    out["qos1_pipelined_vs_qos0"] = out["qos1_pipelined_msg_s"] / out["qos0_msg_s"]
    lat = []
    t0 = time.ticks_us()
    for _ in range(N // 5):
        t = time.ticks_us()
        await c.publish(TOPIC, PAYLOAD, 1, False, wait=True)
        lat.append(time.ticks_diff(time.ticks_us(), t))
    out["qos1_awaited_msg_s"] = len(lat) * 1e6 / time.ticks_diff(time.ticks_us(), t0)
    lat.sort()
    out["puback_p50_ms"] = lat[len(lat) // 2] / 1000
    out["puback_p99_ms"] = lat[len(lat) * 99 // 100] / 1000
    out["mqtt5_bytes_per_telemetry"] = wire_bytes(c)
    await c.disconnect()
    task.cancel()
    c3, task3 = await connected("bench-c", protocol="3.1.1")
    q0, q1 = [], []
    for _ in range(3):
        q0.append((await rate(c3, N, 0))[0])
        q1.append((await rate(c3, N, 1))[0])
    out["qos0_msg_s_311"] = median(q0)
    out["qos1_pipelined_msg_s_311"] = median(q1)
    out["qos0_5_vs_311"] = out["qos0_msg_s"] / out["qos0_msg_s_311"]
    out["qos1_pipelined_5_vs_311"] = out["qos1_pipelined_msg_s"] / out["qos1_pipelined_msg_s_311"]
    out["mqtt311_bytes_per_telemetry"] = wire_bytes(c3)
    await c3.disconnect()
    task3.cancel()
    c1, task1 = await connected("bench-b", window=1)
    w1 = []
    for _ in range(3):
        w1.append((await rate(c1, N // 5, 1))[0])
    out["qos1_window1_msg_s"] = median(w1)
    await c1.disconnect()
    task1.cancel()
    for k in out:
        out[k] = round(out[k], 3) if isinstance(out[k], float) else out[k]
    print(json.dumps(out))


asyncio.run(main())
