# Device entry point and loader, never updated over the air (with boot.py, otaboot.py and,
# on the Unix port, unixflash.py): it picks the application slot from the boot-control
# record, puts it ahead on sys.path, and starts the application (firmware/run.py), from the
# slot or else from the factory image; or, while a deploy holds the board, nothing.
import gc
import sys

# Loading the firmware's bytecode leaves the heap in small scattered holes: on a 128 KB
# heap (64-bit Unix port) 59 KB were free after boot but no block of 8 KB was, and the
# outbox's RAM ring could not be allocated. So the room for the buffers that live as long
# as the boot (outbox ring, MQTT rx/tx, flash record: 7 KB by default) is taken
# first, while the heap is empty and in one piece, and released just before they are
# allocated (Device.build).
gc.collect()
_early = [bytearray(8192)]

if sys.platform == "linux" and sys.path[0]:
    # On the Unix port the repo root is the "flash": lib/ must be importable as on a board
    # (the board on a pty has the root at / and /lib on sys.path already).
    sys.path.append(sys.path[0] + "/lib")

import otaboot

if otaboot.finish_deploy():
    # A deploy's commit was cut short and is complete now: boot its loader, not this one.
    import machine

    machine.reset()
if otaboot.held():
    del _early, otaboot  # the REPL is the deploy's
else:
    _opened = otaboot.load()
    if not otaboot.deadline_armed():
        # The application imports it again when it needs it. A trial keeps it: its deadline
        # lives there until the new version confirms itself (otaboot.confirm).
        sys.modules.pop("otaboot", None)
    del otaboot

    from firmware.run import main

    main(_early, _opened)
