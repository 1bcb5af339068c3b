"""kvtransfer.heap: the allocator tuning the KV server and sender apply to their process."""
import platform

from kvtransfer import heap


def test_keep_large_buffers_takes_effect_on_glibc_and_is_idempotent():
    on_glibc = platform.libc_ver()[0] == "glibc"
    assert heap.keep_large_buffers() is on_glibc
    assert heap.keep_large_buffers() is on_glibc  # a second call changes nothing and says the same

