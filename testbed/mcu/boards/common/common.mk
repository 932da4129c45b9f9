# Shared by testbed/mcu/boards/*: this directory's mpconfigport.h ahead of the port's, and
# littlefs2 (vfs.VfsLfs2), the filesystem the firmware's boards use.
INC += -I$(BOARD_DIR)/../common
MICROPY_VFS_LFS2 = 1
# time.gmtime/localtime/mktime (mpconfigport.h) need the port's date arithmetic.
SRC_C += shared/timeutils/timeutils.c
# The idle wait (mpconfigport.h's MICROPY_INTERNAL_WFE).
SRC_C += $(BOARD_DIR)/../common/mcu_wfe.c
