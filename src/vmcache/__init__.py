"""vmcache: keep QEMU VMs booted ahead of time and hand them out over Kata's VMCache protocol.

The public API, for Trio-based tooling:

- :func:`serve` runs the daemon in your nursery (``await nursery.start(serve, config)``);
- :func:`connect` talks to a running daemon and gets you :class:`VMHandle`\\ s;
- :func:`launch_vm` boots one VM directly, with no daemon;
- :func:`load_config` reads a config file; every error is a :class:`VmcacheError`.
"""

from .client import CacheClient, CacheStatus, connect
from .config import Config, load_config, resolve_spec
from .errors import (
    AgentError,
    BootError,
    CacheError,
    CacheUnavailableError,
    ConfigError,
    DaemonNotRunningError,
    DeadlineExceededError,
    ImageError,
    VmcacheError,
    VMError,
    VMGoneError,
)
from .handle import VMHandle
from .qemu import VM, launch_vm
from .server import serve

__all__ = [
    "VM",
    "AgentError",
    "BootError",
    "CacheClient",
    "CacheError",
    "CacheStatus",
    "CacheUnavailableError",
    "Config",
    "ConfigError",
    "DaemonNotRunningError",
    "DeadlineExceededError",
    "ImageError",
    "VMError",
    "VMGoneError",
    "VMHandle",
    "VmcacheError",
    "connect",
    "launch_vm",
    "load_config",
    "resolve_spec",
    "serve",
]
