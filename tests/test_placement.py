"""Which pool serves which request: the placement rules, without a daemon."""

from __future__ import annotations

from typing import Any

import pytest

from vmcache.config import PoolShape
from vmcache.errors import BadRequestError
from vmcache.placement import Placement, place

SHAPES = [PoolShape("default", 1, 256, 2, "boot"), PoolShape("big", 2, 1024, 1, "boot")]
LIMITS: dict[str, Any] = {"max_vcpus": 4, "max_memory_mib": 4096}


def test_no_size_is_the_default_pool_as_it_is() -> None:
    assert place(SHAPES, **LIMITS) == Placement("default", 1, 256)


def test_each_shape_is_served_by_its_own_pool() -> None:
    assert place(SHAPES, vcpus=1, memory_mib=256, **LIMITS) == Placement("default", 1, 256)
    assert place(SHAPES, vcpus=2, memory_mib=1024, **LIMITS) == Placement("big", 2, 1024)


def test_a_larger_size_grows_the_closest_pool_at_or_below_it() -> None:
    assert place(SHAPES, vcpus=2, memory_mib=2048, **LIMITS) == Placement("big", 2, 2048)
    assert place(SHAPES, vcpus=1, memory_mib=1024, **LIMITS) == Placement("default", 1, 1024)
    assert place(SHAPES, vcpus=3, **LIMITS) == Placement("big", 3, 1024)


def test_a_size_below_every_pool_is_a_cold_boot() -> None:
    shapes = [PoolShape("default", 2, 512, 1, "boot")]
    assert place(shapes, vcpus=1, memory_mib=256, **LIMITS) == Placement(None, 1, 256)


def test_a_named_pool_grows_but_never_shrinks() -> None:
    assert place(SHAPES, pool="big", vcpus=3, **LIMITS) == Placement("big", 3, 1024)
    with pytest.raises(BadRequestError, match="can grow, not shrink"):
        place(SHAPES, pool="big", vcpus=1, **LIMITS)
    with pytest.raises(BadRequestError, match="no pool named 'huge'; pools: default, big"):
        place(SHAPES, pool="huge", **LIMITS)


def test_beyond_the_maxima_is_refused_naming_the_limit() -> None:
    with pytest.raises(BadRequestError, match=r"at most 4 \(hypervisor.qemu.default_maxvcpus\)"):
        place(SHAPES, vcpus=8, **LIMITS)
    with pytest.raises(BadRequestError, match=r"at most 4096 MiB"):
        place(SHAPES, memory_mib=8192, **LIMITS)


def test_memory_grows_in_whole_steps() -> None:
    assert place(SHAPES, memory_mib=300, **LIMITS) == Placement("default", 1, 384)
    with pytest.raises(BadRequestError, match=r"steps of 128 MiB.*4224 MiB is more than"):
        place(SHAPES, memory_mib=4100, max_vcpus=4, max_memory_mib=4100)
