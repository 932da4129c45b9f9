# Runs before main.py on a board. Kept minimal: gc threshold early so fragmentation stays low.
import gc

gc.threshold((gc.mem_free() + gc.mem_alloc()) // 4)
