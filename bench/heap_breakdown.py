# Where a device's held heap goes, on a build with the firmware frozen in (run by
# bench/board_model_bench.py on build/board-model/micropython, from a directory without
# firmware/ and lib/). Boots one device as main.py does and prints one JSON line of
# gc.mem_alloc() deltas after a collect: each module as it is first imported (its own cost,
# not that of the modules it imports), the board, the Device object, the config (and TLS
# context), the boot's objects, the connection, and the running device RUN_S seconds later.
#   micropython heap_breakdown.py RUN_S --flash IMAGE --put /config.json=FILE [--put ...]
import builtins
import gc
import sys

gc.collect()
_start = gc.mem_alloc()
# As main.py: the room for the boot buffers, taken first and released by Device.build.
_early = [bytearray(8192)]
gc.collect()
_reserve = gc.mem_alloc() - _start

modules = []  # [modules first imported by one import statement, own bytes]
_known = set(sys.modules)  # modules that are in `modules` or were there before
_stack = [0]  # bytes taken by the imports inside the one running now, per nesting level
_orig = builtins.__import__


def _import(name, *args):
    # What this function allocates itself is either alive across both ends of a window
    # (`before`), or gone by its end, or records that the statement around subtracts.
    # A module is in sys.modules while its body still runs: only those that were not
    # there when this statement began are its own (an import inside that body must not
    # claim the module around it).
    before = set(sys.modules)
    _stack.append(0)
    gc.collect()
    a = gc.mem_alloc()
    m = _orig(name, *args)
    gc.collect()
    total = gc.mem_alloc() - a
    inner = _stack.pop()
    new = [k for k in sys.modules if k not in before and k not in _known]
    if new:
        _known.update(new)
        modules.append([" ".join(sorted(new)), total - inner])
    new = None
    gc.collect()
    # The statement around this one subtracts all of it: these modules and their records.
    _stack[-1] += gc.mem_alloc() - a
    return m


builtins.__import__ = _import
import asyncio  # noqa: E402
import json  # noqa: E402

from firmware.app import Device, run_devices  # noqa: E402
from firmware.boards import boards  # noqa: E402

steps = []
_last = [0]


def mark(what):
    gc.collect()
    now = gc.mem_alloc()
    steps.append([what, now - _last[0]])
    _last[0] = now


gc.collect()
_last[0] = gc.mem_alloc()
_imports = _last[0] - _start - _reserve  # the modules, and the records of measuring them
run_s = float(sys.argv.pop(1))
# As main.py: the loader mounts the flash (so the board can be updated: its update agent is
# measured as a board's is) and is forgotten unless a trial's deadline needs it.
# Its cost (and unixflash's) is the board step's, not a module's of the firmware.
builtins.__import__ = _orig
import otaboot  # noqa: E402

_opened = otaboot.load()
if not otaboot.deadline_armed():
    sys.modules.pop("otaboot", None)
otaboot = None
builtins.__import__ = _import
devs = boards(_opened)  # parses --flash/--put (firmware.boards.unixargs, dropped after)
mark("board (flash mounted, files put)")
d = Device(devs[0])
d.heap_reserve = _early
mark("Device object")
builtins.__import__ = _orig  # what the boot imports from here on is in its steps
_load_config, _build = d.load_config, d.build
_room = []


async def _loaded():
    mark("boot started: supervisor, watchdog feeder task")
    cfg = await _load_config()
    mark("config loaded%s" % (" (ssl, TLS context: CA, certificate, key)" if d.ssl else ""))
    return cfg


def _built(cfg):
    _build(cfg)
    room = getattr(d.client, "_room", None)  # held while disconnected (mbedTLS's records)
    if room is not None:
        _room.append(len(room))
    mark("boot built: config twin, client, outbox, tasks' objects (less main.py's reserve)")


_spawn = d._spawn_tasks


def _spawned(cfg):
    _spawn(cfg)
    mark("tasks spawned: supervisor records, asyncio tasks, lambdas (not yet run)")


# Instance attributes, so the boot's own calls measure each step as it ends.
d.load_config, d.build, d._spawn_tasks = _loaded, _built, _spawned


def _sizes():
    out = {}
    c = d.client
    for name, obj, attr in (("mqtt tx buffer", c, "_txbuf"), ("mqtt rx buffer", c, "_rxbuf"),
                            ("outbox RAM ring", d.outbox.ring, "buf"),
                            ("outbox flash record", d.outbox.flash, "_buf"),
                            ("log ring", d.logring, "buf")):
        b = getattr(obj, attr, None) if obj is not None else None
        if b is not None:
            out[name] = len(b)
    if _room:
        out["TLS room (boot to connect; freed for the TLS records)"] = _room[0]
    return out


async def probe():
    while d.client is None or not d.client.stats["connects"]:
        await asyncio.sleep_ms(2)
    mark("connected: socket, stream%s" % (", TLS session (mbedTLS buffers)" if d.ssl else ""))
    await asyncio.sleep(run_s)
    mark("running %g s: tasks, queues, caches, first health report" % run_s)
    gc.collect()
    # What only the Unix stand-in pays: its board step (flash image through a Python block
    # device, control file, simulated link) and its board module.
    unix = steps[0][1] + sum(n for names, n in modules if "firmware.boards.unix" in names.split())
    print(json.dumps({"start": _start, "unix_board": unix, "reserve": _reserve, "imports": _imports,
                      "held": gc.mem_alloc(),
                      "modules": modules,
                      "steps": steps, "buffers": _sizes(), "tls": bool(d.ssl),
                      "sys_modules": sorted(sys.modules)}))
    raise SystemExit(0)


async def main():
    asyncio.create_task(probe())
    await run_devices([d])


asyncio.run(main())
