# Runs before main.py on a board, in the same interpreter. Kept minimal: the watchdog first,
# so a hang anywhere later resets the board; gc threshold early so fragmentation stays low.
# Only the loader is imported here, never the application: a module of `firmware` loaded
# now would be the factory image's, and main.py must be free to run an updated slot's.
import gc

import otaboot

otaboot.early_watchdog()
gc.threshold((gc.mem_free() + gc.mem_alloc()) // 4)
