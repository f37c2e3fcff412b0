"""The datapath from userspace: libbpf through cffi, map layouts, loading and attaching."""
