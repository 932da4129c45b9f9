# Guest scenario of bench/mcu_bench.py: the costs with no I/O.
#   verify: one OTA manifest signature check as firmware/otacheck.py makes it
#           (check_signature: parse the signature document, collect, import p256, match the
#           key id, ECDSA P-256 verify), with the heap nearly empty and nearly full; and
#           p256.verify alone the same two ways.
#   twin:   Twin.offer of a ~1 KB desired layer (parse, validate, merge, what changed),
#           and its parts (check_text, json.loads, parse_layer);
#   parts:  where a message's instructions go: an asyncio yield, the PUBLISH header, the
#           telemetry JSON, the outbox in RAM (8 KiB ring and 1 KiB) and on flash per
#           message, and MicroPython's slice store (_SLICE in rig.py).
# Prints "@@MCU {json}" lines, spans in ticks_us.
from rig import *  # noqa: F401,F403  (the rig's names, PARAMS)
import gc
import hashlib
import json
from binascii import hexlify

setup_paths()

from p256_vector import MSG, PUB, SIG  # noqa: E402  (bench/p256_vector.py)

DIGEST = hashlib.sha256(MSG).digest()
KID = hexlify(hashlib.sha256(PUB).digest()[:8]).decode()
SIGTEXT = json.dumps({"key": KID, "sig": hexlify(SIG).decode()})
KEYS = [hexlify(PUB).decode()]


def ballast(free, slots=1024):
    """Pieces of heap held until gc.mem_free() is just above `free` after a collect: large
    pieces first, then ever smaller ones into what is left."""
    gc.collect()
    held = [None] * slots
    i = 0
    piece = 8192
    while piece >= 32 and i < slots:
        gc.collect()
        try:
            while i < slots and gc.mem_free() - piece - 16 >= free:
                held[i] = bytearray(piece)
                i += 1
        except MemoryError:
            pass
        piece //= 2
    gc.collect()
    return held


def verify_figures(reps):
    from firmware import otacheck
    import p256

    if otacheck.check_signature(DIGEST, SIGTEXT, KEYS) != KID or not p256.verify(
            PUB, DIGEST, SIG):
        raise SystemExit("the vector did not verify")
    res = {}
    gc.collect()
    res["heap_free_empty"] = gc.mem_free()
    res["check_empty"] = per_op(lambda: otacheck.check_signature(DIGEST, SIGTEXT, KEYS),
                                reps, warm=1, gc_off=False)
    res["verify_empty"] = per_op(lambda: p256.verify(PUB, DIGEST, SIG), reps, warm=1,
                                 gc_off=False)
    # Nearly full: what check_signature still accepts (VERIFY_HEAP_MIN) plus a little.
    floor = otacheck.VERIFY_HEAP_MIN
    held = ballast(floor + 1024)
    gc.collect()
    res["heap_free_full"] = gc.mem_free()
    try:
        res["check_full"] = per_op(lambda: otacheck.check_signature(DIGEST, SIGTEXT, KEYS),
                                   reps, warm=1, gc_off=False)
    except MemoryError:
        res["check_full"] = None
    held = None
    # p256.verify alone in less: half of the check's floor.
    held = ballast(floor // 2)
    gc.collect()
    res["heap_free_low"] = gc.mem_free()
    try:
        res["verify_low"] = per_op(lambda: p256.verify(PUB, DIGEST, SIG), reps, warm=1,
                                   gc_off=False)
    except MemoryError:
        res["verify_low"] = None
    held = None
    gc.collect()
    return res


def twin_figures(reps):
    from firmware import twin as tw
    from firmware.twin import Twin

    t = Twin(["all", "pumps", "device"], {"telemetry_interval": 60}, APP_SETTINGS)
    # The first offer, then per_op's 2 warm-ups, its 1 sizing call and up to reps timed ones.
    texts = [layer(v) for v in range(1, reps + 5)]
    it = iter(texts)
    changed = t.offer("device", next(it))
    if not changed or t.rejected:
        raise SystemExit("the layer was not applied: %r" % (t.rejections,))
    size = len(texts[0])
    per = per_op(lambda: t.offer("device", next(it)), reps, warm=2)
    alloc = STATS["alloc"]
    if t.rejected:
        raise SystemExit("a layer was rejected: %r" % (t.rejections,))
    text = texts[0]
    return {"twin_offer": per, "twin_offer_alloc": alloc, "twin_offer_n": STATS["n"],
            "layer_bytes": size,
            "twin_check_text": per_op(lambda: tw.check_text(text), reps),
            "twin_json_loads": per_op(lambda: json.loads(text), reps),
            "twin_parse_layer": per_op(lambda: tw.parse_layer(text, APP_SETTINGS), reps),
            "twin_effective": per_op(t.effective, reps)}


def parts_figures(reps):
    import asyncio
    from mqtt import codec
    from outbox.outbox import Outbox
    from firmware.telemetry import Telemetry
    from backoff import Rng

    res = {}
    topic = b"devices/bench-0001/telemetry"
    buf = bytearray(1024)
    res["publish_header"] = per_op(
        lambda: codec.publish_header_into(buf, topic, 79, 1, False, False, 7), reps)

    # One asyncio round trip (a task yielding with sleep_ms(0)), with a socket registered
    # for reading as the client's read loop keeps one.
    install_socket()
    sock = FakeSocketModule.socket()

    async def yields():
        from asyncio import core

        core._io_queue.queue_read(sock)  # as StreamReader.readinto does, never woken here
        t = asyncio.create_task(asyncio.Event().wait())  # one more task, as a client has
        await asyncio.sleep_ms(0)
        gc.collect()
        t0 = us()
        for _ in range(reps):
            await asyncio.sleep_ms(0)
        res["asyncio_yield"] = since(t0) / reps
        t.cancel()

    Warp.install()
    asyncio.run(yields())
    asyncio.new_event_loop()

    board = fake_board(None)
    tel = Telemetry(board, Rng(1), None, topic, 1, 60)
    res["telemetry_json"] = per_op(lambda: tel.payload(board.read_sensors(tel.rnd)), reps)
    payload = tel.payload({"temp_c": 21.23}).encode()

    def cycle(ob):
        def once():
            ob.put(topic, payload, 1, ob.stats["put"])
            rec = ob.next()
            ob.handed_over()
            ob.ack(rec[2])
        return once

    for size in (8192, 1024):
        ob = Outbox(None, ram_bytes=size, ticks_ms=Warp.ticks, ticks_diff=time.ticks_diff,
                    topic=topic)
        res["outbox_ram_%d" % size] = per_op(cycle(ob), reps)
    # On flash: the records spilled, then each handed over and acknowledged (the drain).
    bdev, fs = ram_flash(131072)
    ob = Outbox(fs, ram_bytes=8192, flash_bytes=98304, ticks_ms=Warp.ticks,
                ticks_diff=time.ticks_diff, topic=topic)
    ob.recover()
    k = 3 * reps + 10
    for i in range(k):
        ob.put(topic, payload, 1, i)
        if ob.ring.count >= 40:
            ob.spill()
    ob.spill()
    if ob._fcount() != k:
        raise SystemExit("outbox: %d of %d on flash" % (ob._fcount(), k))

    def drain_one():
        rec = ob.next()
        ob.handed_over()
        ob.ack(rec[2])

    for _ in range(5):
        drain_one()
    gc.collect()
    before = bdev.counts()
    t0 = us()
    for _ in range(reps):
        drain_one()
    res["outbox_flash_drain"] = since(t0) / reps
    calls = [a - b for a, b in zip(bdev.counts(), before)]
    res["outbox_flash_drain_driver"] = bdev.share(before) / reps
    res["outbox_flash_drain_reads"] = calls[0] / reps
    res["outbox_flash_drain_read_bytes"] = calls[1] / reps

    big = bytearray(8192)
    view = memoryview(big)
    ten = bytes(10)

    def at_start():
        big[0:10] = ten

    def at_end():
        big[8182:8192] = ten

    def into_view():
        view[0:10][:] = ten

    res["slice_store_10_into_8k_at_start"] = per_op(at_start, reps)
    res["slice_store_10_into_8k_at_end"] = per_op(at_end, reps)
    res["slice_store_10_into_view"] = per_op(into_view, reps)
    return res


what = PARAMS.get("what", ("verify", "twin", "parts"))
if "parts" in what:
    out(**parts_figures(PARAMS.get("parts_reps", 30)))
if "twin" in what:
    out(**twin_figures(PARAMS.get("twin_reps", 20)))
if "verify" in what:
    out(**verify_figures(PARAMS.get("verify_reps", 3)))
