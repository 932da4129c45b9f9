// The board model's ROMFS partition (make board-model, build/board-model-romfs): a host file
// mapped into memory, as a board's flash partition is mapped into its address space, so
// `mpremote romfs deploy` writes it through vfs.rom_ioctl and the image's .mpy run in place
// from /rom. MICROPY_ROMFS names the file (no partition without it), MICROPY_ROMFS_BYTES
// its size (default 256 KiB; a new file is made erased, all 0xff). The Unix port's own
// rom_ioctl, a read-only empty stub, is renamed away when main.c is compiled (romfs.mk).
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "py/mperrno.h"
#include "py/objarray.h"
#include "py/runtime.h"
#include "extmod/vfs.h"

#if MICROPY_VFS_ROM_IOCTL

static uint8_t *part;
static size_t part_len;
static mp_obj_array_t part_obj = {{&mp_type_memoryview}, 'B', 0, 0, NULL};

static int part_open(void) {
    if (part != NULL) {
        return 1;
    }
    const char *path = getenv("MICROPY_ROMFS");
    if (path == NULL || !*path) {
        return 0;
    }
    const char *bytes = getenv("MICROPY_ROMFS_BYTES");
    size_t len = bytes ? (size_t)strtoul(bytes, NULL, 0) : 256 * 1024;
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) {
        return 0;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && (size_t)st.st_size < len) {
        // Erased flash reads 0xff.
        uint8_t ff[4096];
        memset(ff, 0xff, sizeof(ff));
        lseek(fd, st.st_size, SEEK_SET);
        for (size_t n = st.st_size; n < len; n += sizeof(ff)) {
            if (write(fd, ff, len - n < sizeof(ff) ? len - n : sizeof(ff)) < 0) {
                close(fd);
                return 0;
            }
        }
    }
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        return 0;
    }
    part = p;
    part_len = len;
    part_obj.len = len;
    part_obj.items = part;
    return 1;
}

mp_obj_t mp_vfs_rom_ioctl(size_t n_args, const mp_obj_t *args) {
    mp_int_t cmd = mp_obj_get_int(args[0]);
    int have = part_open();
    if (cmd == MP_VFS_ROM_IOCTL_GET_NUMBER_OF_SEGMENTS) {
        return MP_OBJ_NEW_SMALL_INT(have);
    }
    if (n_args < 2 || !have || mp_obj_get_int(args[1]) != 0) {
        return MP_OBJ_NEW_SMALL_INT(-MP_EINVAL);
    }
    switch (cmd) {
        case MP_VFS_ROM_IOCTL_GET_SEGMENT:
            return MP_OBJ_FROM_PTR(&part_obj);
        case MP_VFS_ROM_IOCTL_GET_MIN_PREPARE:
            return MP_OBJ_NEW_SMALL_INT(4096);
        case MP_VFS_ROM_IOCTL_WRITE_PREPARE: {
            // (3, id, len) or (3, id, offset, len): erase that range; returns the smallest
            // write the partition takes.
            if (n_args < 3) {
                return MP_OBJ_NEW_SMALL_INT(-MP_EINVAL);
            }
            size_t off = n_args == 3 ? 0 : (size_t)mp_obj_get_int(args[2]);
            size_t len = (size_t)mp_obj_get_int(args[n_args == 3 ? 2 : 3]);
            if (off > part_len || len > part_len - off) {
                return MP_OBJ_NEW_SMALL_INT(-MP_EINVAL);
            }
            memset(part + off, 0xff, len);
            return MP_OBJ_NEW_SMALL_INT(4);
        }
        case MP_VFS_ROM_IOCTL_WRITE: {
            if (n_args < 4) {
                return MP_OBJ_NEW_SMALL_INT(-MP_EINVAL);
            }
            size_t off = (size_t)mp_obj_get_int(args[2]);
            mp_buffer_info_t buf;
            mp_get_buffer_raise(args[3], &buf, MP_BUFFER_READ);
            if (off > part_len || buf.len > part_len - off) {
                return MP_OBJ_NEW_SMALL_INT(-MP_EINVAL);
            }
            memcpy(part + off, buf.buf, buf.len);
            return MP_OBJ_NEW_SMALL_INT(0);
        }
        case MP_VFS_ROM_IOCTL_WRITE_COMPLETE:
            msync(part, part_len, MS_SYNC);
            return MP_OBJ_NEW_SMALL_INT(0);
    }
    return MP_OBJ_NEW_SMALL_INT(-MP_EINVAL);
}

#endif
