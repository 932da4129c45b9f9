"""Messages larger than the client's preallocated 1 KiB buffers, both ways, against a real
mosquitto: written as header + payload, read into a buffer of their own (up to max_frame),
byte for byte intact; a frame above max_frame is refused before it is read."""
import os
import subprocess

from testbed.devices import ROOT, micropython_path

SCRIPT = r'''
import sys
sys.path.append(%(lib)r)
import asyncio
from mqtt.client import MQTTClient

got = []

def on_message(topic, payload, retain):
    got.append((bytes(topic), bytes(payload)))

async def main():
    c = MQTTClient("big", %(host)r, %(port)d, clean=True, max_frame=8192, buf_size=1024,
                   log=lambda l, m: print(l, m), on_message=on_message)
    c.subscribe("loop/#", 1)
    t = asyncio.create_task(c.run())
    await c.connected.wait()
    big = bytes(range(256)) * 12  # 3072 bytes
    await c.publish("loop/q1", big, 1, wait=True)
    rev = bytes(reversed(big))
    await c.publish("loop/q0", rev, 0)
    await c.publish("loop/small", b"s", 1, wait=True)
    for _ in range(200):
        if len(got) >= 3:
            break
        await asyncio.sleep_ms(20)
    got.sort()
    print("GOT", [(t, len(p)) for t, p in got])
    assert got[0] == (b"loop/q0", rev) and got[1] == (b"loop/q1", big)
    assert got[2] == (b"loop/small", b"s")
    print("BIG_FRAMES", c.stats["big_frames"])
    try:
        await c.publish("loop/x", b"x" * 9000, 1)
    except ValueError as e:
        print("REFUSED", e)
    await c.disconnect()
    t.cancel()

asyncio.run(main())
'''


def test_messages_larger_than_the_buffers_go_both_ways_intact(broker, tmp_path):
    script = tmp_path / "big.py"
    script.write_text(SCRIPT % {"lib": os.path.join(ROOT, "lib"), "host": broker.host,
                                "port": broker.port})
    r = subprocess.run([micropython_path(), str(script)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "GOT [(b'loop/q0', 3072), (b'loop/q1', 3072), (b'loop/small', 1)]" in r.stdout
    assert "BIG_FRAMES 2" in r.stdout
    assert "REFUSED message larger than max_frame" in r.stdout
