"""libbpf through cffi (ABI mode: no compiler needed at install time).

Only the calls cilia makes are declared. Structs passed by pointer are declared with
exactly the members libbpf 1.x has, in order, so cffi computes the same layout; their
leading `sz` member is how libbpf versions agree on what the caller knows.
"""

from __future__ import annotations

import errno
import logging
import os

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    struct bpf_object;
    struct bpf_program;
    struct bpf_map;

    struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
    int bpf_object__load(struct bpf_object *obj);
    void bpf_object__close(struct bpf_object *obj);
    struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj,
                                                         const char *name);
    struct bpf_map *bpf_object__next_map(const struct bpf_object *obj,
                                         const struct bpf_map *map);
    int bpf_program__fd(const struct bpf_program *prog);
    const char *bpf_map__name(const struct bpf_map *map);
    int bpf_map__set_pin_path(struct bpf_map *map, const char *path);
    int bpf_map__set_max_entries(struct bpf_map *map, uint32_t max_entries);
    int bpf_map__fd(const struct bpf_map *map);

    int bpf_obj_get(const char *pathname);
    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
    int bpf_map_lookup_elem(int fd, const void *key, void *value);
    int bpf_map_delete_elem(int fd, const void *key);
    int bpf_map_get_next_key(int fd, const void *key, void *next_key);
    int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys,
                             void *values, uint32_t *count, const void *opts);
    int libbpf_num_possible_cpus(void);

    /* Socket LB (agent/socket_lb.py): a global set before load, programs hung on a
     * cgroup by bpf_links pinned in bpffs. enum bpf_attach_type travels as an int. */
    struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj,
                                                 const char *name);
    int bpf_map__set_initial_value(struct bpf_map *map, const void *data, size_t size);
    const void *bpf_map__initial_value(struct bpf_map *map, size_t *psize);
    int bpf_obj_pin(int fd, const char *pathname);
    int bpf_link_create(int prog_fd, int target_fd, int attach_type, const void *opts);
    int bpf_link_update(int link_fd, int new_prog_fd, const void *opts);
    int bpf_link_detach(int link_fd);
    /* The head of the kernel's struct bpf_link_info with its cgroup member (the union
     * is 8-aligned, hence the pad). */
    struct bpf_link_info_cgroup {
        uint32_t type;
        uint32_t id;
        uint32_t prog_id;
        uint32_t pad;
        uint64_t cgroup_id;
        uint32_t attach_type;
        uint32_t pad2;
    };

    struct bpf_map_info {
        uint32_t type;
        uint32_t id;
        uint32_t key_size;
        uint32_t value_size;
        uint32_t max_entries;
        uint32_t map_flags;
        char name[16];
        uint32_t ifindex;
        uint32_t btf_vmlinux_value_type_id;
        uint64_t netns_dev;
        uint64_t netns_ino;
        uint32_t btf_id;
        uint32_t btf_key_type_id;
        uint32_t btf_value_type_id;
        uint32_t pad;
        uint64_t map_extra;
    };
    int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len);

    /* The head of the kernel's struct bpf_prog_info, up to the name: the kernel fills
     * as much as the caller's length asks for. */
    struct bpf_prog_info_head {
        uint32_t type;
        uint32_t id;
        uint8_t tag[8];
        uint32_t jited_prog_len;
        uint32_t xlated_prog_len;
        uint64_t jited_prog_insns;
        uint64_t xlated_prog_insns;
        uint64_t load_time;
        uint32_t created_by_uid;
        uint32_t nr_map_ids;
        uint64_t map_ids;
        char name[16];
    };
    int bpf_prog_get_fd_by_id(uint32_t id);

    enum bpf_tc_attach_point {
        BPF_TC_INGRESS = 1,
        BPF_TC_EGRESS = 2,
        BPF_TC_CUSTOM = 4,
    };
    struct bpf_tc_hook {
        size_t sz;
        int ifindex;
        enum bpf_tc_attach_point attach_point;
        uint32_t parent;
    };
    struct bpf_tc_opts {
        size_t sz;
        int prog_fd;
        uint32_t flags;
        uint32_t prog_id;
        uint32_t handle;
        uint32_t priority;
    };
    int bpf_tc_hook_create(struct bpf_tc_hook *hook);
    int bpf_tc_attach(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);
    int bpf_tc_detach(const struct bpf_tc_hook *hook, const struct bpf_tc_opts *opts);
    int bpf_tc_query(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);

    struct bpf_xdp_query_opts {
        size_t sz;
        uint32_t prog_id;
        uint32_t drv_prog_id;
        uint32_t hw_prog_id;
        uint32_t skb_prog_id;
        uint8_t attach_mode;
    };
    int bpf_xdp_attach(int ifindex, int prog_fd, uint32_t flags, const void *opts);
    int bpf_xdp_detach(int ifindex, uint32_t flags, const void *opts);
    int bpf_xdp_query(int ifindex, int flags, struct bpf_xdp_query_opts *opts);

    struct ring_buffer;
    typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
    struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb,
                                         void *ctx, const void *opts);
    int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
    int ring_buffer__consume(struct ring_buffer *rb);
    void ring_buffer__free(struct ring_buffer *rb);

    /* Kernel drop reasons (cilia/datapath/kernel_drops.py): a tracing program attached
     * where its section says, by a link this process holds; the names of enum
     * skb_drop_reason from the kernel's BTF. */
    struct bpf_link;
    struct bpf_link *bpf_program__attach(const struct bpf_program *prog);
    int bpf_link__destroy(struct bpf_link *link);
    struct btf;
    struct btf_type {
        uint32_t name_off;
        uint32_t info;
        uint32_t size;
    };
    struct btf_enum {
        uint32_t name_off;
        int32_t val;
    };
    struct btf *btf__load_vmlinux_btf(void);
    void btf__free(struct btf *btf);
    int32_t btf__find_by_name_kind(const struct btf *btf, const char *name, uint32_t kind);
    const struct btf_type *btf__type_by_id(const struct btf *btf, uint32_t id);
    const char *btf__name_by_offset(const struct btf *btf, uint32_t offset);

    /* va_list travels as a pointer on x86-64 and arm64 alike; vsnprintf takes it back. */
    typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *args);
    libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
    int vsnprintf(char *str, size_t size, const char *format, void *ap);
    """
)

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_TC_F_REPLACE = 1
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_ATTACHED_DRV = 1
XDP_ATTACHED_SKB = 2
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_CGROUP_INET4_CONNECT = 10  # enum bpf_attach_type
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_LINK_TYPE_CGROUP = 3  # enum bpf_link_type


class LibbpfError(OSError):
    """A libbpf call failed; errno and the call are kept for the message."""


_lib = None
_libc = None
log = logging.getLogger("libbpf")

# Netlink's answer when the clsact qdisc already exists (expected on every attach), and
# libbpf's notice of the BTF anchor section (bpf/lib/events.h), which it rightly skips.
_BENIGN = ("Exclusivity flag on", "skipping unrecognized data section")


@ffi.callback("int(int, const char *, void *)")
def _print(level: int, fmt, args) -> int:
    buf = ffi.new("char[]", 4096)
    _libc.vsnprintf(buf, 4096, fmt, args)
    text = ffi.string(buf).decode(errors="replace").rstrip()
    if not any(b in text for b in _BENIGN):
        # libbpf levels: 0 warn, 1 info, 2 debug
        log.log({0: logging.WARNING, 1: logging.INFO}.get(level, logging.DEBUG), "%s", text)
    return 0


def lib():
    """The loaded libbpf, opened on first use so importing cilia never needs it."""
    global _lib
    if _lib is None:
        for name in ("libbpf.so.1", "libbpf.so"):
            try:
                _lib = ffi.dlopen(name)
                break
            except OSError:
                continue
        else:
            raise LibbpfError(
                errno.ENOENT,
                "libbpf not found (libbpf.so.1): install it with `apt-get install libbpf1`",
            )
        global _libc
        _libc = ffi.dlopen(None)
        _lib.libbpf_set_print(_print)
    return _lib


def check(ret: int, what: str) -> int:
    """libbpf 1.x returns -errno from int calls; turn that into an exception."""
    if ret < 0:
        err = -ret
        raise LibbpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def check_ptr(ptr, what: str):
    """libbpf 1.x returns NULL and sets errno from pointer calls."""
    if ptr == ffi.NULL:
        err = ffi.errno or errno.EINVAL
        raise LibbpfError(err, f"{what}: {os.strerror(err)}")
    return ptr
