"""Which pool serves a request for a VM of some size (pure: no I/O, tested on its own).

Every pool keeps VMs of one shape; a VM can grow (hot-added vCPUs and memory) up
to the maxima, never shrink. So a request for ``vcpus`` and ``memory``:

* naming a pool is served from that pool, its VM grown to the size if the size
  is larger than the pool's shape (a size smaller than the shape is refused);
* naming none is served from the pool whose shape is the closest at or below the
  size in both dimensions (the least growth: an exact match needs none), and
  with no size at all from the default pool, as it is;
* with no pool at or below the size (a size smaller than every pool's), but within
  the maxima, by a VM booted cold at that size;
* beyond the maxima, or naming no pool that exists: refused, naming the limit.

Memory grows in whole hot-add steps (128 MiB) above a pool's: a request is rounded up.
"""

from __future__ import annotations

import attrs

from .config import DEFAULT_POOL, MEMORY_HOTPLUG_STEP_MIB, PoolShape
from .errors import BadRequestError

MEMORY_STEP = MEMORY_HOTPLUG_STEP_MIB


@attrs.frozen
class Placement:
    """Where a request's VM comes from, and the size it is handed out at."""

    pool: str | None  # None: booted cold at this size, just for this request
    vcpus: int
    memory_mib: int

    def grows_from(self, shape: PoolShape) -> bool:
        return (self.vcpus, self.memory_mib) != (shape.vcpus, shape.memory_mib)


def place(shapes: list[PoolShape], *, vcpus: int = 0, memory_mib: int = 0, pool: str = "",
          max_vcpus: int, max_memory_mib: int) -> Placement:
    """Place a request (0 / "" = not asked); raises :class:`BadRequestError` saying why not."""
    by_name = {shape.name: shape for shape in shapes}
    if vcpus > max_vcpus:
        raise BadRequestError(f"{vcpus} vCPUs asked; at most {max_vcpus} "
                              "(hypervisor.qemu.default_maxvcpus)")
    if memory_mib > max_memory_mib:
        raise BadRequestError(f"{memory_mib} MiB asked; at most {max_memory_mib} MiB "
                              "(hypervisor.qemu.default_maxmemory)")
    if pool:
        shape = by_name.get(pool)
        if shape is None:
            raise BadRequestError(f"no pool named {pool!r}; pools: {', '.join(by_name)}")
        wanted = Placement(pool, vcpus or shape.vcpus, memory_mib or shape.memory_mib)
        if wanted.vcpus < shape.vcpus or wanted.memory_mib < shape.memory_mib:
            raise BadRequestError(
                f"pool {pool!r} has VMs of {shape.vcpus} vCPUs and {shape.memory_mib} MiB: "
                "they can grow, not shrink; ask another pool or no pool")
        return _in_steps(wanted, shape, max_memory_mib)
    if not vcpus and not memory_mib:
        default = by_name[DEFAULT_POOL]
        return Placement(DEFAULT_POOL, default.vcpus, default.memory_mib)
    fitting = [shape for shape in shapes
               if (not vcpus or shape.vcpus <= vcpus) and (not memory_mib or shape.memory_mib <= memory_mib)]
    if fitting:
        closest = max(fitting, key=lambda shape: (shape.memory_mib, shape.vcpus, shape.name == DEFAULT_POOL))
        wanted = Placement(closest.name, vcpus or closest.vcpus, memory_mib or closest.memory_mib)
        return _in_steps(wanted, closest, max_memory_mib)
    smallest = min(shapes, key=lambda shape: (shape.memory_mib, shape.vcpus))
    return Placement(None, vcpus or smallest.vcpus, memory_mib or smallest.memory_mib)


def _in_steps(wanted: Placement, shape: PoolShape, max_memory_mib: int) -> Placement:
    """Memory grows in whole hot-add steps above the pool's: a request is rounded up."""
    steps = -(-(wanted.memory_mib - shape.memory_mib) // MEMORY_STEP)
    rounded = shape.memory_mib + steps * MEMORY_STEP
    if rounded > max_memory_mib:
        raise BadRequestError(
            f"{wanted.memory_mib} MiB asked: memory grows in steps of {MEMORY_STEP} MiB from pool "
            f"{shape.name!r}'s {shape.memory_mib} MiB, and {rounded} MiB is more than the maximum of "
            f"{max_memory_mib} MiB (hypervisor.qemu.default_maxmemory)")
    return attrs.evolve(wanted, memory_mib=rounded)
