"""How many programs of a compiled kernel an SM holds at once: the CUDA occupancy
calculator's rules (``cuda_occupancy.h``) for its registers, threads and shared
memory. Persistent grids are sized from it (``Kernel.programs_per_sm``): a grid
of more programs than the GPU holds runs in waves, its last wave on part of the
GPU, with a partial result more to merge for each program past the first wave.
``ci/compile_sm90.py`` reports it for every compiled variant, on sm_90's limits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class SMLimits:
    """One SM's limits, as the occupancy calculator has them."""

    registers_per_sm: int = 65536
    registers_per_block: int = 65536
    max_registers_per_thread: int = 255
    register_allocation_unit: int = 256  # registers are allocated per warp, in units of 256
    sub_partitions: int = 4  # register file quarters; a warp's registers come from one
    threads_per_sm: int = 2048
    threads_per_block: int = 1024
    blocks_per_sm: int = 32
    shared_per_sm: int = 233472  # 228 KB
    shared_per_block: int = 232448  # 227 KB, opt-in above 48 KB (Triton opts in)
    shared_reserved_per_block: int = 1024  # the system's share of every block's shared memory
    shared_allocation_unit: int = 128


SM90 = SMLimits()
"""H100 and H200 (compute capability 9.0)."""

# Resident blocks an SM holds, by compute capability: the one limit device properties do not give.
_BLOCKS_PER_SM = {(7, 5): 16, (8, 6): 16, (8, 7): 16, (8, 9): 24}


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def programs_per_sm(registers: int, threads: int, shared_bytes: int, limits: SMLimits = SM90) -> tuple[int, str]:
    """Programs (thread blocks) of a kernel resident on one SM at once, and the limiting resource.

    The least of the blocks the thread, block, register and shared-memory limits
    each allow. A warp's registers, ``registers * 32``, are rounded up to the
    allocation unit and come from one of the register file's sub-partitions, so an
    SM holds ``sub_partitions * (registers_per_sm / sub_partitions // per_warp)``
    warps. The hardware's per-block check counts a block's warps rounded up to the
    sub-partitions. A block's shared memory is its bytes plus the system's reserved
    1 KB, rounded up to 128 bytes. 0: the kernel cannot launch.
    """
    warps = -(-threads // 32)
    per_warp = _round_up(registers * 32, limits.register_allocation_unit)
    partitions = limits.sub_partitions
    shared = _round_up(shared_bytes + limits.shared_reserved_per_block, limits.shared_allocation_unit)
    if (
        threads > limits.threads_per_block
        or registers > limits.max_registers_per_thread
        or per_warp * _round_up(warps, partitions) > limits.registers_per_block
        or shared_bytes > limits.shared_per_block
    ):
        return 0, "cannot launch"
    by_limit = {
        "threads": limits.threads_per_sm // (warps * 32),
        "blocks": limits.blocks_per_sm,
        "registers": (limits.registers_per_sm // partitions // per_warp) * partitions // warps
        if per_warp
        else limits.blocks_per_sm,
        "shared memory": limits.shared_per_sm // shared,
    }
    limiter = min(by_limit, key=by_limit.get)
    return by_limit[limiter], limiter


@functools.cache
def device_limits(device_index: int) -> SMLimits:
    """The limits of CUDA device ``device_index``'s SMs, from its properties."""
    import torch

    p = torch.cuda.get_device_properties(device_index)
    return SMLimits(
        registers_per_sm=p.regs_per_multiprocessor,
        registers_per_block=p.regs_per_multiprocessor,
        threads_per_sm=p.max_threads_per_multi_processor,
        threads_per_block=p.max_threads_per_block,
        blocks_per_sm=_BLOCKS_PER_SM.get((p.major, p.minor), 32),
        shared_per_sm=p.shared_memory_per_multiprocessor,
        shared_per_block=p.shared_memory_per_block_optin,
    )
