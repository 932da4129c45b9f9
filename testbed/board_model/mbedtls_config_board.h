// mbedTLS configuration of the board-model build (testbed/board_model/build.sh): the Unix
// port's own, but with mbedTLS allocating from the MicroPython GC heap, as it does on the
// RP2 (Pico W) and other bare-metal ports. The Unix port's default takes it from libc's
// malloc, where the heap figures of a TLS device would not see the ~30 KB it holds.
// MicroPython's coverage variant builds the same way.
#ifndef BOARD_MODEL_MBEDTLS_CONFIG_H
#define BOARD_MODEL_MBEDTLS_CONFIG_H

#define MICROPY_MBEDTLS_CONFIG_BARE_METAL (1)
#include "ports/unix/mbedtls/mbedtls_config_port.h"

// Bare metal also means a hardware entropy source, which a Unix process has not: take the
// platform's (/dev/urandom), as the coverage variant does.
#undef MBEDTLS_ENTROPY_HARDWARE_ALT
#undef MBEDTLS_NO_PLATFORM_ENTROPY

#endif
