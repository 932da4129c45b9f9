// The Unix port's standard variant with vfs.rom_ioctl on (it has VfsRom, not the ioctl):
// the board model's ROMFS build (testbed/board_model/build.sh, romfs_file.c).
#define MICROPY_CONFIG_ROM_LEVEL (MICROPY_CONFIG_ROM_LEVEL_EXTRA_FEATURES)

#include "variants/mpconfigvariant_common.h"

#undef MICROPY_VFS_ROM_IOCTL
#define MICROPY_VFS_ROM_IOCTL (1)
