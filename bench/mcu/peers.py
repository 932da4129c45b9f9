# Guest scenario of bench/mcu_bench.py: one MQTT client's cost per publish on
# the fake broker, PARAMS["client"] one of
#   ours          lib/mqtt's MQTTClient (asyncio), as firmware/app.py builds it
#   umqtt.simple  micropython-lib's (blocking), from PARAMS["peer_dir"]/umqtt_simple.py
#   mqtt_as       peterhinch's (asyncio), from PARAMS["peer_dir"]/mqtt_as.py, with fake
#                 network (WLAN) and machine (unique_id) modules
# The peers' sources come from the host (the fetched mirrors), never from this repository.
# Figures, in ticks_us per message (N messages after a warm-up, collected before):
#   qos0, qos1: a publish call until it returns; QoS 1 awaited (until its PUBACK was
#               processed), the only way the peers publish QoS 1;
#   qos1_pipelined (ours): wait=False, the firmware's way, until the last PUBACK;
#   sock0, sock1: the fake socket's own share of qos0/qos1 (its calls replayed alone);
#   idle_per_s: the work of an idle connected client per second (keepalive loops, polls).
from rig import *  # noqa: F401,F403  (the rig's names, PARAMS)
import gc

setup_paths()
install_socket()

import asyncio

Warp.install()

CLIENT = PARAMS.get("client", "ours")
N = PARAMS.get("n", 50)
TOPIC = b"devices/bench-0001/telemetry"
PAYLOAD = b"x" * 64


def quiet(level, msg):
    pass


class FakeWLAN:
    def __init__(self, *a):
        pass

    def active(self, *a):
        return True

    def isconnected(self):
        return True

    def connect(self, *a, **k):
        pass

    def disconnect(self):
        pass

    def status(self, *a):
        return 1010  # STAT_GOT_IP

    def config(self, *a, **k):
        return None

    def ifconfig(self, *a):
        return ("192.0.2.10", "255.255.255.0", "192.0.2.1", "192.0.2.1")


class FakeNetwork:
    STA_IF = 0
    AP_IF = 1
    STAT_IDLE = 1000
    STAT_CONNECTING = 1001
    STAT_GOT_IP = 1010
    WLAN = FakeWLAN


class FakeMachine:
    @staticmethod
    def unique_id():
        return b"\xb0\x0c\x5e\x01\x02\x03"


def load_peer(name):
    """Import the peer's source file from peer_dir with the fake hardware modules."""
    import sys

    saved = {k: sys.modules.get(k) for k in ("network", "machine")}
    sys.modules["network"] = FakeNetwork
    sys.modules["machine"] = FakeMachine
    sys.path.insert(0, PARAMS["peer_dir"])
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)
        for k, m in saved.items():
            if m is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = m


async def ours():
    from mqtt.client import MQTTClient

    c = MQTTClient("bench-ours", "broker.example", 1883, keepalive=60, clean=True, window=16,
                   log=quiet, ticks_ms=Warp.ticks)
    task = asyncio.create_task(c.run())
    await c.connected.wait()
    sock = FakeSocketModule.last
    res = {}
    res["qos0"] = await aper_op(lambda: c.publish(TOPIC, PAYLOAD, 0), N)
    res["qos0_alloc"] = STATS["alloc"]
    res["qos1"] = await aper_op(lambda: c.publish(TOPIC, PAYLOAD, 1, wait=True), N)
    res["qos1_alloc"] = STATS["alloc"]
    burst_n = 16  # the window: handed over without waiting, then every PUBACK

    async def burst():
        for _ in range(burst_n):
            await c.publish(TOPIC, PAYLOAD, 1, wait=False)
        while len(c.session):
            await asyncio.sleep_ms(0)

    res["qos1_pipelined"] = await aper_op(burst, max(1, N // burst_n)) / burst_n
    res["qos1_pipelined_alloc"] = STATS["alloc"] / burst_n
    res["sock0"] = await ashare_of(sock, lambda: c.publish(TOPIC, PAYLOAD, 0))
    res["sock1"] = await ashare_of(sock, lambda: c.publish(TOPIC, PAYLOAD, 1, wait=True))
    res["idle_per_s"] = await idle()
    res["writes_per_qos1"] = await ops_count(sock, lambda: c.publish(TOPIC, PAYLOAD, 1,
                                                                      wait=True))
    return res


async def ops_count(sock, call):
    w = sock.writes
    await call()
    return sock.writes - w


async def idle(seconds=30):
    """ticks_us of work per second of an idle, connected client (virtual seconds)."""
    await asyncio.sleep(1)
    gc.collect()
    t0 = us()
    await asyncio.sleep(seconds)
    return since(t0) / seconds


def umqtt():
    m = load_peer("umqtt_simple")
    c = m.MQTTClient(b"bench-umqtt", "broker.example", keepalive=60)
    c.connect()
    sock = FakeSocketModule.last
    res = {}
    res["qos0"] = per_op(lambda: c.publish(TOPIC, PAYLOAD, False, 0), N)
    res["qos0_alloc"] = STATS["alloc"]
    res["qos1"] = per_op(lambda: c.publish(TOPIC, PAYLOAD, False, 1), N)
    res["qos1_alloc"] = STATS["alloc"]
    res["sock0"] = share_of(sock, lambda: c.publish(TOPIC, PAYLOAD, False, 0))
    res["sock1"] = share_of(sock, lambda: c.publish(TOPIC, PAYLOAD, False, 1))
    w = sock.writes
    c.publish(TOPIC, PAYLOAD, False, 1)
    res["writes_per_qos1"] = sock.writes - w
    res["idle_per_s"] = 0  # blocking: nothing runs unless the application calls it
    return res


async def mqtt_as():
    m = load_peer("mqtt_as")
    m.ticks_ms = Warp.ticks  # its timeouts on the same clock as asyncio's
    cfg = dict(m.config)
    cfg.update(server="broker.example", ssid="bench", wifi_pw="bench", keepalive=60,
               clean=True, queue_len=0, client_id=b"bench-mqtt-as")
    c = m.MQTTClient(cfg)
    await c.connect(quick=True)
    sock = FakeSocketModule.last
    res = {}
    res["qos0"] = await aper_op(lambda: c.publish(TOPIC, PAYLOAD, False, 0), N)
    res["qos0_alloc"] = STATS["alloc"]
    res["qos1"] = await aper_op(lambda: c.publish(TOPIC, PAYLOAD, False, 1), N)
    res["qos1_alloc"] = STATS["alloc"]
    res["sock0"] = await ashare_of(sock, lambda: c.publish(TOPIC, PAYLOAD, False, 0))
    res["sock1"] = await ashare_of(sock, lambda: c.publish(TOPIC, PAYLOAD, False, 1))
    res["idle_per_s"] = await idle()
    res["writes_per_qos1"] = await ops_count(sock, lambda: c.publish(TOPIC, PAYLOAD, False, 1))
    return res


gc.collect()
if CLIENT == "ours":
    res = asyncio.run(ours())
elif CLIENT == "umqtt.simple":
    res = umqtt()
elif CLIENT == "mqtt_as":
    res = asyncio.run(mqtt_as())
else:
    raise SystemExit("no client %r" % CLIENT)
res["client"] = CLIENT
res["warp_ms"] = Warp.skipped_ms
res["collect"], res["heap_free"] = collect_cost()
out(**res)
