"""Making a device failure real in a test: every buffer that lives on the failed devices is deleted."""

from __future__ import annotations

from collections.abc import Collection

import jax


def lose_devices(failed: Collection[jax.Device]) -> int:
    """Delete this process's buffers on `failed`: whole arrays that live only there, and the failed devices'
    shards of arrays that also live elsewhere (their other shards stay). Returns how many buffers went."""
    failed = set(failed)
    lost = 0
    for array in jax.live_arrays():
        if array.is_deleted():
            continue
        if set(array.devices()) <= failed:
            lost += len(array.addressable_shards)
            array.delete()
            continue
        for shard in array.addressable_shards:
            if shard.device in failed:
                shard.data.delete()
                lost += 1
    return lost
