"""A peer that stops reading (a dead route, a stalled broker, a full lwIP send buffer):
the writes back up and drains never finish. The client must still declare the link dead
by keepalive, and the next connection must not inherit the stuck writers."""
import os
import socket
import subprocess
import threading

from testbed.devices import ROOT, micropython_path

SCRIPT = r'''
import sys
sys.path.append(%(lib)r)
import asyncio, time
from mqtt.client import MQTTClient
from backoff import Backoff, Rng

t0 = time.ticks_ms()
def log(level, msg):
    print("%%d %%s %%s" %% (time.ticks_diff(time.ticks_ms(), t0), level, msg))

c = MQTTClient("stall", "127.0.0.1", %(port)d, keepalive=2, timeout=3, log=log, max_frame=8192,
               backoff=Backoff(Rng(1), base=0.2, cap=0.5, first_window=0.3))

async def flood():
    await c.connected.wait()
    while c.is_connected():
        try:
            await c.publish("t", b"x" * 4000, qos=0)
        except OSError:
            break

async def main():
    asyncio.create_task(c.run())
    asyncio.create_task(flood())
    for _ in range(200):
        await asyncio.sleep_ms(100)
        if c.stats["connects"] >= 2 and c.is_connected():
            break
    print("CONNECTS", c.stats["connects"])
    pid = await asyncio.wait_for(c.publish("t", b"hello", qos=1, wait=True), 5)
    print("ACKED", pid)
    await c.disconnect()

asyncio.run(main())
'''


def _stub_broker():
    """First connection: CONNACK, then never read again. Later ones: a minimal broker."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ls.bind(("127.0.0.1", 0))
    ls.listen(5)
    held = []

    def serve(c):
        f = c.makefile("rb")
        try:
            while True:
                b0 = f.read(1)
                if not b0:
                    return
                n, m = 0, 1
                while True:
                    b = f.read(1)[0]
                    n += (b & 127) * m
                    m *= 128
                    if not b & 128:
                        break
                body = f.read(n)
                t = b0[0] >> 4
                if t == 1:
                    c.sendall(b"\x20\x02\x00\x00")
                elif t == 12:
                    c.sendall(b"\xd0\x00")
                elif t == 3 and b0[0] & 6:
                    tl = (body[0] << 8) | body[1]
                    c.sendall(b"\x40\x02" + body[2 + tl:4 + tl])
                elif t == 14:
                    return
        except OSError:
            pass
        finally:
            c.close()

    def accept():
        first = True
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            if first:
                first = False
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                c.recv(64)
                c.sendall(b"\x20\x02\x00\x00")
                held.append(c)  # never read from again
            else:
                threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return ls, held


def test_a_peer_that_stops_reading_is_detected_and_the_next_connection_works(tmp_path):
    ls, held = _stub_broker()
    try:
        script = tmp_path / "stall.py"
        script.write_text(SCRIPT % {"lib": os.path.join(ROOT, "lib"),
                                    "port": ls.getsockname()[1]})
        r = subprocess.run([micropython_path(), str(script)], capture_output=True, text=True,
                           timeout=60)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        dead = [l for l in out.splitlines()
                if "link dead" in l or "write stalled" in l]
        assert dead, out
        # Declared dead within 1.5 x keepalive (3 s) + a check step, or by the write bound.
        assert int(dead[0].split()[0]) <= 3000 + 1000 + 500, dead[0]
        assert "CONNECTS 2" in out and "ACKED" in out, out
    finally:
        ls.close()
        for c in held:
            c.close()
