# Runs a batch of hostile inputs through the firmware's own entry points inside the Unix
# port (not a test module: tests/host/test_hostile_input.py writes the batch, runs this and
# judges the results). One process per batch, one "@@R {json}" line per input.
#
#   micropython tests/mpy/hostile_batch.py BATCH_FILE FLASH_IMAGE
#
# Each line of BATCH_FILE is {"k": kind, "t": topic or "", "p": payload as hex}:
#   boot     the bytes are /config.json on the flash: bootconfig.load, as the app calls it
#   desired  a desired layer on topic t, through Device._on_message (routing, twin, apply,
#            cache, config/reported), with a fresh twin holding one device layer first
#   cmd      a command on topic t, through Device._on_message (routing, Commands, handlers)
# Every exception that escapes the firmware is reported as such ("exc"), never hidden.
import sys

root = sys.argv[0].rsplit("/", 3)[0] if "/" in sys.argv[0] else "."
sys.path.append(root)
sys.path.append(root + "/lib")

import asyncio
import json
from binascii import hexlify, unhexlify

from firmware import bootconfig
from firmware.app import Device
from firmware.boards.unix import Board
from firmware.twin import Twin
from mqtt import codec

INITIAL = b'{"version": 1, "telemetry_interval": 3}'

board = Board(sys.argv[2], 262144, label="fz")
dev = Device(board)
cfg = bootconfig.validate({"device_id": "fz", "broker": {"host": "127.0.0.1", "port": 9},
                           "groups": ["model-x"], "telemetry_interval": 7})
dev.build(cfg)
sent = []


async def publish(topic, payload, qos=0, retain=False, wait=True, token=None):
    # The real client's size rule: a message over max_frame is a ValueError to the caller.
    t = topic.encode() if isinstance(topic, str) else topic
    p = payload.encode() if isinstance(payload, str) else payload
    if codec.publish_size(t, p, qos) > dev.client.max_frame:
        raise ValueError("message larger than max_frame")
    sent.append((bytes(t), bytes(p)))
    return 1


dev.client.publish = publish
print("@@BASE " + json.dumps(Twin(dev.sync.twin.order, dev.sync.twin.base).effective()))


def out(i, **r):
    r["i"] = i
    print("@@R " + json.dumps(r))


def hx(b):
    return hexlify(b).decode()


async def one(i, kind, topic, payload):
    sent.clear()
    if kind == "boot":
        with board.fs.open("/config.json", "wb") as f:
            f.write(payload)
        try:
            c = bootconfig.load(board.fs)
        except Exception as e:
            out(i, r="exc", e=type(e).__name__, conf=isinstance(e, bootconfig.ConfigError),
                m=hx(str(e).encode()))
            return
        out(i, r="ok", id=hx(c["device_id"].encode()), prefix=hx(c["prefix"].encode()),
            groups=[hx(g.encode()) for g in c["groups"]])
        return
    sync = dev.sync
    if kind == "desired":
        t0 = sync.twin
        sync.twin = Twin(t0.order, t0.base)
        sync.pending_reboot = []
        sync._sent = None
        await dev._on_message(dev.topics.desired.encode(), memoryview(INITIAL), True)
        sent.clear()
    tw = sync.twin
    c = dev.commands
    before = (tw.rejected, c.rejected, c.handled, tw.effective())
    try:
        await dev._on_message(topic.encode(), memoryview(bytearray(payload)), True)
    except Exception as e:
        out(i, r="exc", e=type(e).__name__, m=hx(str(e).encode()))
        return
    eff = tw.effective()
    out(i, r="done", twin_rejected=tw.rejected - before[0], cmd_rejected=c.rejected - before[1],
        cmd_handled=c.handled - before[2], unchanged=eff == before[3],
        eff=eff, sent=[[hx(t), hx(p)] for t, p in sent])


async def main():
    with open(sys.argv[1]) as f:
        i = 0
        for line in f:
            item = json.loads(line)
            await one(i, item["k"], item["t"], unhexlify(item["p"]))
            i += 1
    print("@@END %d" % i)


asyncio.run(main())
