# Guest scenario of bench/mcu_bench.py: a whole firmware Device
# (firmware/app.py) on a fake board (rig.fake_board: RAM flash with littlefs, a Wi-Fi link
# that joins at once, no console) and the fake broker, in one fresh interpreter:
#   boot:     from the start of what main.py does (the 8 KB reserve, the imports, Device
#             construction, run_devices; asyncio's import timed apart and added) to the
#             first telemetry PUBLISH written to the socket
#             (boot_any: to the first PUBLISH of any kind); main.py's loader step
#             (otaboot.load: slots on the flash) and the board choice (boards(): the qemu
#             port is none of ours) are left out, the flash is mounted and holds
#             /config.json before it starts, as a board's does at power-on;
#   telemetry: one reading as the telemetry task takes it (Telemetry._reading: sample, JSON
#             payload, outbox put), the drain task's handover and PUBLISH, written, and its
#             PUBACK read and processed (the outbox ack), N times;
#   config:   a ~1 KB desired layer delivered by the broker (QoS 1, retained) until the
#             device's PUBACK for it is written and its config/reported publish is
#             acknowledged: parse, validate, apply, cache on flash, report;
#   drain:    after an outage (link down, Q readings queued and spilled to flash), from the
#             new TCP connection to the last PUBACK processed (drain_only: from the CONNECT
#             written, which the broker answers at once). The client resends the session's
#             messages and goes on with those the drain task hands over meanwhile before it
#             calls itself connected, so the birth message and the config report follow the
#             backlog and are not in the figure.
# Prints "@@MCU {json}" lines, spans in ticks_us.
from rig import *  # noqa: F401,F403  (the rig's names, PARAMS)
import gc

setup_paths()
install_socket()

import json

N_TEL = PARAMS.get("n", 30)
N_CFG = PARAMS.get("cfg_n", 5)
QUEUE = PARAMS.get("queue", 1000)
FLASH = PARAMS.get("flash", 262144)

bdev, fs = ram_flash(FLASH)
CONFIG = {
    "device_id": "bench-0001",
    "broker": {"host": "broker.example", "port": 1883, "keepalive": 60},
    "wifi": [{"ssid": "bench", "password": "bench-password"}],
    "telemetry_interval": 60,
    # The queue of QUEUE readings must fit: ~100 B a record, 32 KiB segments.
    "outbox": {"flash_bytes": min(FLASH * 3 // 4, 196608)},
}
with fs.open("/config.json", "w") as f:
    f.write(json.dumps(CONFIG))

stamps = {}


def watch(topic, qos):
    if topic.endswith(b"/telemetry") and "tel" not in stamps:
        stamps["tel"] = us()
        first_tel.set()


FakeSocketModule.watch = watch
_socket = FakeSocketModule.socket


def _new_socket(*a):
    s = _socket(*a)
    s.watch = FakeSocketModule.watch
    stamps["socket"] = us()
    stamps["socket_warp"] = Warp.skipped_ms
    return s


FakeSocketModule.socket = staticmethod(_new_socket)
# asyncio's import is part of the boot, but the virtual clock must be in it before the boot
# runs (Warp.install compiles the loop it sends): the import is timed here and added.
gc.collect()
t0 = us()
import asyncio  # noqa: E402

IMPORT_ASYNCIO = since(t0)
Warp.install()
first_tel = asyncio.Event()
gc.collect()
heap_before = gc.mem_alloc()
boot_flash = bdev.counts()

# ---- boot: what main.py and firmware/run.py do, from here ----------------------------
T0 = us()
gc.collect()
_early = [bytearray(8192)]  # as main.py
from firmware.app import Device, run_devices  # noqa: E402

board = fake_board(fs)
if PARAMS.get("debug"):
    board.log = print
dev = Device(board)
dev.heap_reserve = _early
_early = None


async def settle(s=3):
    """Let the connect's publishes (birth, config report) go and be acknowledged."""
    await asyncio.sleep(s)
    c = dev.client
    while len(c.session) or len(dev.outbox):
        await asyncio.sleep_ms(10)


async def main():
    runner = asyncio.create_task(run_devices([dev]))
    await first_tel.wait()
    sock = FakeSocketModule.last
    # The stamps are the writes' (watch), after which the rig parses no more at each write.
    FakeSocketModule.watch = sock.watch = None
    out(boot=stamps["tel"] - T0 + IMPORT_ASYNCIO, boot_any=sock.first_pub - T0 + IMPORT_ASYNCIO,
        boot_import_asyncio=IMPORT_ASYNCIO, boot_flash_share=bdev.share(boot_flash))
    await settle()
    cost, free = collect_cost()
    out(heap_alloc_running=gc.mem_alloc(), heap_free_running=free, heap_before=heap_before,
        collect=cost)
    c = dev.client

    # -- telemetry: reading -> JSON -> outbox -> PUBLISH -> PUBACK -> outbox ack
    acked = asyncio.Event()
    on_ack = c.on_ack

    def ack_hook(m):
        on_ack(m)
        if m.token is not None and not len(dev.outbox):
            acked.set()

    c.on_ack = ack_hook

    async def one():
        acked.clear()
        await dev.telemetry._reading()
        await acked.wait()

    tel = await aper_op(one, N_TEL, warm=3)
    out(telemetry=tel, telemetry_alloc=STATS["alloc"], telemetry_n=STATS["n"],
        telemetry_sock=await ashare_of(sock, one),
        payload_bytes=len(dev.telemetry.payload({"temp_c": 21.23})))
    dev.telemetry.seq -= 1

    # -- config: a desired layer from the broker to the acknowledged report
    topic = dev.topics.desired.encode()
    pubacks = asyncio.Event()
    sock.on_cpuback = pubacks.set

    async def layer_in(v):
        pubacks.clear()
        sock.inject(publish_packet(topic, layer(v).encode(), 1, 100 + v, True))
        await pubacks.wait()
        while len(c.session):
            await asyncio.sleep_ms(0)

    version = [1000]

    async def next_layer():
        version[0] += 1
        await layer_in(version[0])

    before = bdev.counts()
    calls0 = version[0]
    cfg_full = await aper_op(next_layer, N_CFG, warm=2)
    cfg_alloc, cfg_n = STATS["alloc"], STATS["n"]
    cfg_flash = bdev.share(before) / (version[0] - calls0)  # per layer, warm-ups included
    tw = dev.sync.twin
    if tw.rejected or tw.layers["device"][0] != version[0]:
        raise SystemExit("config: %r %r" % (tw.rejections, tw.layers.get("device")))
    out(config_full=cfg_full, config_alloc=cfg_alloc, config_n=cfg_n,
        config_flash_share=cfg_flash, config_rejected=tw.rejected)
    sock.on_cpuback = None

    # -- drain after an outage
    board.link.up = False
    await asyncio.sleep(3)  # the link supervisor notices, the client drops the connection
    if c.is_connected():
        raise SystemExit("drain: still connected in the outage")
    for _ in range(QUEUE):
        await dev.telemetry._reading()
    await asyncio.sleep(2)  # the spill loop moves the RAM ring to flash
    ob = dev.outbox
    queued = len(ob)
    on_flash = ob._fcount()
    done = asyncio.Event()

    def drain_hook(m):
        on_ack(m)
        if not len(ob):
            stamps["empty"] = us()
            done.set()

    c.on_ack = drain_hook
    if PARAMS.get("debug"):
        async def show():
            while True:
                await asyncio.sleep(2)
                print("drain: queued %d inflight %d session %d connected %s link %s" % (
                    len(ob), ob.inflight, len(c.session), c.is_connected(), dev.link.up.is_set()))

        asyncio.create_task(show())
    gc.collect()
    before = bdev.counts()
    reaped = fs.reaped
    board.link.up = True
    await done.wait()
    out(drain=stamps["empty"] - stamps["socket"],
        drain_only=stamps["empty"] - FakeSocketModule.last.connect_at,
        drain_queued=queued, drain_on_flash=on_flash,
        drain_flash_calls=[a - b for a, b in zip(bdev.counts(), before)],
        drain_flash_share=bdev.share(before), drain_files_left_open=fs.reaped - reaped,
        drain_warp_ms=Warp.skipped_ms - stamps["socket_warp"], warp_ms=Warp.skipped_ms)
    runner.cancel()


asyncio.run(main())
