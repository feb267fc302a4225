"""vmcache: keep QEMU VMs booted ahead of time and hand them out over Kata's VMCache protocol.

The public API, for Trio-based tooling:

- :func:`serve` runs the daemon in your nursery (``await nursery.start(serve, config)``);
- :func:`connect` talks to a running daemon: ``get_vm()`` and ``lease_vm()`` give you
  :class:`VMHandle`\\ s;
- :func:`launch_vm` boots one VM directly, with no daemon;
- :func:`load_config` reads a config file; every error is a :class:`VmcacheError`.

Names are imported on first use (PEP 562), so that ``vmcache`` the command starts
quickly and can take charge of signals before the heavy imports.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: ``import typing`` costs time the command line needs
if TYPE_CHECKING:
    from typing import Any

    from .agent_client import CompletedProcess, GuestProcess, PtySize
    from .client import CacheClient, VMSize, connect
    from .config import Config, load_config, resolve_spec
    from .errors import (
        AgentError,
        AgentProtocolError,
        BadRequestError,
        BootError,
        CacheError,
        CacheUnavailableError,
        ConfigError,
        DaemonError,
        DaemonNotRunningError,
        DeadlineExceededError,
        DependencyError,
        EndpointInUseError,
        FailedPreconditionError,
        GuestConnectError,
        GuestConnectionBrokenError,
        GuestOutputLimitError,
        GuestPortRefusedError,
        GuestProcessError,
        GuestRequestError,
        HandleError,
        HandOutAbortedError,
        HardwareAccelRequiredError,
        ImageError,
        InvalidRequestError,
        LeaseLostError,
        LifecycleError,
        LocalOutputError,
        NetworkPolicyError,
        NetworkSetupError,
        NoSuchVMError,
        NotAllowedError,
        NoVMAvailableError,
        PermissionDeniedError,
        PortForwardError,
        QMPError,
        QMPProtocolError,
        QuotaExceededError,
        QuotaReachedError,
        ResizeError,
        SizeLimitError,
        UnknownVMError,
        VmcacheError,
        VMDiedError,
        VMError,
        VMGoneError,
        WaitExpiredError,
    )
    from .handle import VMHandle
    from .network_policy import AllowEntry, NetworkMode, NetworkPolicy
    from .qemu import VM, launch_vm
    from .server import serve
    from .wire import CacheEvent, CacheStatus

__all__ = [
    "VM",
    "AgentError",
    "AgentProtocolError",
    "AllowEntry",
    "BadRequestError",
    "BootError",
    "CacheClient",
    "CacheError",
    "CacheEvent",
    "CacheStatus",
    "CacheUnavailableError",
    "CompletedProcess",
    "Config",
    "ConfigError",
    "DaemonError",
    "DaemonNotRunningError",
    "DeadlineExceededError",
    "DependencyError",
    "EndpointInUseError",
    "FailedPreconditionError",
    "GuestConnectError",
    "GuestConnectionBrokenError",
    "GuestOutputLimitError",
    "GuestPortRefusedError",
    "GuestProcess",
    "GuestProcessError",
    "GuestRequestError",
    "HandOutAbortedError",
    "HandleError",
    "HardwareAccelRequiredError",
    "ImageError",
    "InvalidRequestError",
    "LeaseLostError",
    "LifecycleError",
    "LocalOutputError",
    "NetworkMode",
    "NetworkPolicy",
    "NetworkPolicyError",
    "NetworkSetupError",
    "NoSuchVMError",
    "NoVMAvailableError",
    "NotAllowedError",
    "PermissionDeniedError",
    "PortForwardError",
    "PtySize",
    "QMPError",
    "QMPProtocolError",
    "QuotaExceededError",
    "QuotaReachedError",
    "ResizeError",
    "SizeLimitError",
    "UnknownVMError",
    "VMDiedError",
    "VMError",
    "VMGoneError",
    "VMHandle",
    "VMSize",
    "VmcacheError",
    "WaitExpiredError",
    "connect",
    "launch_vm",
    "load_config",
    "resolve_spec",
    "serve",
]

_WHERE = {
    "CacheClient": "client", "connect": "client", "VMSize": "client",
    "CompletedProcess": "agent_client", "GuestProcess": "agent_client", "PtySize": "agent_client",
    "Config": "config", "load_config": "config", "resolve_spec": "config",
    **{name: "errors" for name in __all__ if name.endswith("Error")},  # every class of errors.py
    "VMHandle": "handle",
    "AllowEntry": "network_policy", "NetworkMode": "network_policy",
    "NetworkPolicy": "network_policy",
    "VM": "qemu", "launch_vm": "qemu",
    "serve": "server",
    "CacheEvent": "wire", "CacheStatus": "wire",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'vmcache' has no attribute {name!r}")
    if module in ("server", "client"):  # purerpc: say so in one line if its h2 is wrong
        importlib.import_module(".errors", __name__).check_h2()
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
