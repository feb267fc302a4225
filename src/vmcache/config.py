"""Configuration: a TOML file with Kata's key names, structured by cattrs.

Example (every key optional; these are the defaults)::

    [factory]
    vm_cache_number = 1          # VMs kept booted and ready
    vm_cache_endpoint = ""       # the daemon's Unix socket; "" = vmcache.paths default
    idle_vms = "paused"          # idle cached VMs: "paused" (QMP stop: no CPU) or "running"
    hot_vms = 1                  # VMs next in line kept running and fresh: no wait at hand-out

    [hypervisor.qemu]
    path = "qemu-system-x86_64"  # QEMU binary, a path or a name looked up on PATH
    kernel = ""                  # "" = the default guest image (vmcache image build)
    initrd = ""                  # "" = the default guest image
    image = ""                   # root filesystem image; "" = the default image's
    kernel_params = ""           # appended to the kernel command line
    machine_type = "q35"
    default_vcpus = 1
    default_memory = 256         # MiB
    default_maxvcpus = 0         # vCPUs a VM may grow to (hot-add); 0 = the host's CPUs
    default_maxmemory = 4096     # MiB a VM may grow to (DIMMs, 128 MiB steps); 0 = host RAM
    accel = "auto"               # "kvm", "tcg" or "auto" (KVM, falling back to TCG)
    boot_timeout = 30.0          # seconds until the guest agent must say READY
    kvm_probe_timeout = 10.0     # with accel "auto": how long a KVM guest may take
    require_hardware_accel = false  # true: never boot or hand out a TCG VM

    [network]                    # per pool too: [pools.NAME.network] (replaces this one whole)
    mode = "none"                # "none" (no NIC) or "restricted" (the allowlist, host-enforced)
    allow = []                   # what a VM may reach when a request names no policy
    permit = allow               # the ceiling a request's own policy must stay within

    [e2b]                        # the API E2B's SDKs talk to (docs/e2b.md); off by default
    listen = ""                  # "127.0.0.1:3000"; a non-loopback host only when written here
    api_keys_file = ""           # one API key a line; owned by root or the daemon, mode 0600

    [image]                      # what `vmcache image build --config FILE` builds
    packages = []                # Debian packages added to the default root image
    mirror = ""                  # Debian mirror; "" = the host apt's, else deb.debian.org

An unknown key or a value of the wrong type or range is a :class:`ConfigError`
naming the key and the file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import attrs
import cattrs

from .errors import ConfigError, ImageError, NetworkPolicyError
from .image import (
    AGENT_DIR,
    AGENT_FILES,
    HELPER_FILES,
    INITRD_FILE,
    KERNEL_FILE,
    ROOTFS_FILE,
    image_id,
    read_manifest,
)
from .image.cpio import S_IFREG, read_initrd, resolve_path
from .network_policy import AllowEntry, NetworkMode, NetworkPolicy, parse_entries
from .paths import default_endpoint, default_image_dir, default_run_dir

ACCELERATORS = ("auto", "kvm", "tcg")
#: Hot-added memory comes in DIMMs of whole guest memory blocks: 128 MiB on x86-64 (Linux's
#: memory block size for guests under 64 GiB). A DIMM that is not a multiple of it cannot
#: be onlined whole, so the headroom (default_maxmemory - default_memory) is one too.
MEMORY_HOTPLUG_STEP_MIB = 128
#: The most vCPUs a VM may have: Kata's cap for QEMU (default_maxvcpus).
MAX_VCPUS = 240
#: QEMU's seccomp filter, Kata's default; used where the QEMU binary supports -sandbox.
DEFAULT_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


class _RangeError(ValueError):
    """A value of the right type outside its range; its text names the rule."""

    def __init__(self, attribute: attrs.Attribute[Any], rule: str) -> None:
        super().__init__(rule)
        self.key = attribute.name


def _at_least(minimum: float) -> Any:
    def check(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
        if value < minimum:
            raise _RangeError(attribute, f"must be at least {minimum}, not {value}")

    return check


def _positive(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise _RangeError(attribute, f"must be more than 0, not {value}")


def _one_of(*choices: str) -> Any:
    def check(_instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise _RangeError(attribute, f"must be one of {', '.join(choices)}, not {value!r}")

    return check


def _single_line(_instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise _RangeError(attribute, "must be one line (no newline or NUL)")


@attrs.frozen
class FactoryConfig:
    """``[factory]``: the cache itself."""

    vm_cache_number: int = attrs.field(default=1, validator=_at_least(1))
    vm_cache_endpoint: str = attrs.field(default="", validator=_single_line)
    socket_group: str = attrs.field(default="", validator=_single_line)
    boot_retry_initial: float = attrs.field(default=0.5, validator=_positive)
    boot_retry_max: float = attrs.field(default=30.0, validator=_positive)
    health_interval: float = attrs.field(default=5.0, validator=_positive)
    max_parallel_boots: int = attrs.field(default=0, validator=_at_least(0))
    max_vms_per_uid: int = attrs.field(default=0, validator=_at_least(0))
    boot_mode: str = attrs.field(default="boot", validator=_one_of("boot", "snapshot"))
    idle_vms: str = attrs.field(default="paused", validator=_one_of("paused", "running"))
    hot_vms: int = attrs.field(default=1, validator=_at_least(0))
    share_template_memory: bool = True


@attrs.frozen
class QemuConfig:
    """``[hypervisor.qemu]``: how each cached VM is started."""

    path: str = attrs.field(default="qemu-system-x86_64", validator=_single_line)
    kernel: str = attrs.field(default="", validator=_single_line)
    initrd: str = attrs.field(default="", validator=_single_line)
    image: str = attrs.field(default="", validator=_single_line)
    kernel_params: str = attrs.field(default="", validator=_single_line)
    machine_type: str = attrs.field(default="q35", validator=_single_line)
    default_vcpus: int = attrs.field(default=1, validator=_at_least(1))
    default_memory: int = attrs.field(default=256, validator=_at_least(64))
    accel: str = attrs.field(default="auto", validator=_one_of(*ACCELERATORS))
    boot_timeout: float = attrs.field(default=30.0, validator=_positive)
    kvm_probe_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: For hosts that run hostile code: VMs must run on KVM. With TCG the only choice (accel
    #: "tcg", or "auto" finding KVM unusable), the daemon boots and hands out nothing and
    #: answers hand-outs FAILED_PRECONDITION (see vmcache.accel).
    require_hardware_accel: bool = False
    seccompsandbox: str = attrs.field(default=DEFAULT_SANDBOX, validator=_single_line)
    tb_size: int = attrs.field(default=0, validator=_at_least(0))
    default_maxvcpus: int = attrs.field(default=0, validator=_at_least(0))
    default_maxmemory: int = attrs.field(default=4096, validator=_at_least(0))

    def __attrs_post_init__(self) -> None:
        fields = attrs.fields(QemuConfig)
        if self.default_maxvcpus and not self.default_vcpus <= self.default_maxvcpus <= MAX_VCPUS:
            raise _RangeError(fields.default_maxvcpus,
                              f"must be 0 (the host's CPUs) or from default_vcpus ({self.default_vcpus}) "
                              f"to {MAX_VCPUS}, not {self.default_maxvcpus}")
        if self.default_maxmemory:
            headroom = self.default_maxmemory - self.default_memory
            if headroom < 0:
                raise _RangeError(fields.default_maxmemory,
                                  f"must be 0 (the host's RAM) or at least default_memory "
                                  f"({self.default_memory}), not {self.default_maxmemory}")
            if headroom % MEMORY_HOTPLUG_STEP_MIB:
                raise _RangeError(fields.default_maxmemory, (
                    f"must be default_memory ({self.default_memory}) plus a multiple of "
                    f"{MEMORY_HOTPLUG_STEP_MIB} MiB (memory is hot-added in {MEMORY_HOTPLUG_STEP_MIB} "
                    f"MiB steps), not {self.default_maxmemory}: "
                    f"{self.default_maxmemory - headroom % MEMORY_HOTPLUG_STEP_MIB} would do"))


def _package_names(_instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for name in value:
        if not name or any(char.isspace() or char == "," for char in name):
            raise _RangeError(attribute, f"must be Debian package names, not {name!r}")


@attrs.frozen
class ImageConfig:
    """``[image]``: what ``vmcache image build --config FILE`` puts in the default root image."""

    packages: tuple[str, ...] = attrs.field(default=(), validator=_package_names)
    mirror: str = attrs.field(default="", validator=_single_line)


#: Per-VM uids come from here by default: above systemd's container range (which ends at
#: 1879048191) and far from ordinary users, subordinate ranges and nobody (65534).
JAIL_UID_BASE = 2_000_000_000


@attrs.frozen
class JailConfig:
    """``[jail]``: how every QEMU is confined (see docs/security.md)."""

    enabled: bool = True
    uid_base: int = attrs.field(default=JAIL_UID_BASE, validator=_at_least(1))
    uid_count: int = attrs.field(default=65536, validator=_at_least(1))
    memory_overhead: int = attrs.field(default=256, validator=_at_least(32))
    pids_max: int = attrs.field(default=0, validator=_at_least(0))
    cpus: float = attrs.field(default=0.0, validator=_at_least(0))
    allow_no_seccomp: bool = False

    def __attrs_post_init__(self) -> None:
        if self.uid_base + self.uid_count > 2**32 - 2:
            raise _RangeError(attrs.fields(JailConfig).uid_count,
                              f"uid_base + uid_count must stay below {2**32 - 2}")


@attrs.frozen
class HypervisorConfig:
    qemu: QemuConfig = attrs.Factory(QemuConfig)


def _allow_entries(_instance: object, attribute: attrs.Attribute[Any],
                   value: tuple[str, ...] | None) -> None:
    for text in value or ():
        try:
            AllowEntry.parse(text)
        except NetworkPolicyError as error:
            raise _RangeError(attribute, str(error).replace("network allow entry ", "entry ", 1)) from None


@attrs.frozen
class NetworkConfig:
    """``[network]`` (and ``[pools.NAME.network]``): a pool's VMs' network (see
    :mod:`vmcache.network_policy`). ``mode`` and ``allow`` are the policy a request gets when
    it names none; ``permit`` is the ceiling a request's own policy must stay within
    (unset: the same as ``allow``). A pool that can ever grant network (:attr:`needs_nic`)
    boots its VMs with a NIC, which only a root daemon can give them."""

    mode: str = attrs.field(default="none", validator=_one_of(*NetworkMode))
    allow: tuple[str, ...] = attrs.field(default=(), validator=_allow_entries)
    #: None (not set in the file): the same as ``allow``.
    permit: tuple[str, ...] | None = attrs.field(default=None, validator=_allow_entries)

    def __attrs_post_init__(self) -> None:
        fields = attrs.fields(NetworkConfig)
        if self.mode == NetworkMode.NONE and self.allow:
            raise _RangeError(fields.allow, "needs mode = \"restricted\": with mode \"none\" a "
                                            "VM has no network (entries a request may ask for go "
                                            "in permit)")
        beyond = self.policy.beyond(self.ceiling)
        if beyond:
            raise _RangeError(fields.allow, f"entry {str(beyond[0])!r} is beyond permit: add it to "
                                            "permit (or drop it from allow)")

    @property
    def policy(self) -> NetworkPolicy:
        """What a request that names no policy gets."""
        return NetworkPolicy.parse(self.mode, self.allow)

    @property
    def ceiling(self) -> tuple[AllowEntry, ...]:
        """``permit`` parsed (``allow``'s entries when it is not set)."""
        return parse_entries(self.allow if self.permit is None else self.permit)

    @property
    def needs_nic(self) -> bool:
        """Whether this pool's VMs can ever be granted network (mode restricted, or a request
        may ask for it): they boot with a NIC (which drops everything until a restricted
        policy is applied at hand-out)."""
        return self.mode == NetworkMode.RESTRICTED or bool(self.ceiling)


#: What a pool's name may look like (it appears in logs, Status and the command line).
POOL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
DEFAULT_POOL = "default"


@attrs.frozen
class PoolConfig:
    """``[pools.NAME]``: a pool of cached VMs of another shape than the default pool's."""

    vm_cache_number: int = attrs.field(default=1, validator=_at_least(1))
    vcpus: int = attrs.field(default=1, validator=_at_least(1))
    memory: int = attrs.field(default=256, validator=_at_least(64))
    boot_mode: str = attrs.field(default="boot", validator=_one_of("boot", "snapshot"))
    #: ``[pools.NAME.network]``; None: the top ``[network]``. Given, it replaces that one
    #: whole (its unset keys take their defaults, not the top table's): what a pool's
    #: table says is all the network its VMs can get.
    network: NetworkConfig | None = None


@attrs.frozen
class PoolShape:
    """One pool as the daemon runs it: the default pool (Kata's keys) or a named one."""

    name: str
    vcpus: int
    memory_mib: int
    size: int
    boot_mode: str
    network: NetworkConfig = attrs.Factory(NetworkConfig)


def _pool_names(_instance: object, attribute: attrs.Attribute[Any], value: dict[str, PoolConfig]) -> None:
    for name in value:
        if name == DEFAULT_POOL or not POOL_NAME.fullmatch(name):
            raise _RangeError(attribute, f"pool name {name!r} must match {POOL_NAME.pattern} "
                                         f"and not be {DEFAULT_POOL!r}")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:3000`` for IPv6) as (host, port); ValueError saying why not."""
    host, colon, port_text = value.rpartition(":")
    if not colon or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"must be HOST:PORT (\"127.0.0.1:3000\"), not {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(char.isspace() or char in "/[]" for char in host):
        raise ValueError(f"must be HOST:PORT (\"127.0.0.1:3000\"), not {value!r}")
    return host, int(port_text)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(_instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value:
        try:
            parse_listen(value)
        except ValueError as error:
            raise _RangeError(attribute, str(error)) from None


@attrs.frozen
class E2BConfig:
    """``[e2b]``: the listener E2B's SDKs talk to (vmcache.e2b_server); off while ``listen``
    is empty. A host that is not loopback is served only when written here, and logged."""

    listen: str = attrs.field(default="", validator=_listen)
    api_keys_file: str = attrs.field(default="", validator=_single_line)

    def __attrs_post_init__(self) -> None:
        if self.listen and not self.api_keys_file:
            raise _RangeError(attrs.fields(E2BConfig).api_keys_file,
                              "is needed with listen: a file of API keys, one a line, readable "
                              "by its owner only")

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on, None when off."""
        return parse_listen(self.listen) if self.listen else None


@attrs.frozen
class Config:
    """The whole configuration. ``source`` is the file it came from, if any."""

    factory: FactoryConfig = attrs.Factory(FactoryConfig)
    hypervisor: HypervisorConfig = attrs.Factory(HypervisorConfig)
    image: ImageConfig = attrs.Factory(ImageConfig)
    jail: JailConfig = attrs.Factory(JailConfig)
    network: NetworkConfig = attrs.Factory(NetworkConfig)
    pools: dict[str, PoolConfig] = attrs.field(factory=dict, validator=_pool_names)
    e2b: E2BConfig = attrs.Factory(E2BConfig)
    source: str = ""

    @property
    def qemu(self) -> QemuConfig:
        return self.hypervisor.qemu

    def endpoint(self) -> Path:
        """The socket path from the config, else the default."""
        return Path(self.factory.vm_cache_endpoint or default_endpoint())

    def pool_shapes(self) -> list[PoolShape]:
        """Every pool the daemon keeps: the default one first, then the named ones by name."""
        shapes = [PoolShape(DEFAULT_POOL, self.qemu.default_vcpus, self.qemu.default_memory,
                            self.factory.vm_cache_number, self.factory.boot_mode, self.network)]
        shapes += [PoolShape(name, pool.vcpus, pool.memory, pool.vm_cache_number, pool.boot_mode,
                             pool.network if pool.network is not None else self.network)
                   for name, pool in sorted(self.pools.items())]
        return shapes


@attrs.frozen
class VMSpec:
    """Everything needed to start one VM, with every path checked to exist."""

    qemu: Path
    kernel: Path
    initrd: Path
    kernel_params: str
    machine_type: str
    vcpus: int
    memory_mib: int
    accel: str
    boot_timeout: float
    kvm_probe_timeout: float
    run_root: Path
    #: Never boot a VM on TCG (see QemuConfig.require_hardware_accel).
    require_hardware_accel: bool = attrs.field(default=False, kw_only=True)
    image: str = ""
    #: The root filesystem image attached read-only (None: the initramfs is the root).
    rootfs: Path | None = None
    sandbox: str = ""
    tb_size_mib: int = 0
    #: Guest RAM in this memfd instead of anonymous memory (QEMU maps it through
    #: /proc/self/fd): a snapshot template writes it (shared), VMs restored from the template
    #: map it privately (copy on write) once it is sealed, so the pages they do not write stay
    #: shared between them and none of them can change it (see vmcache.snapshot).
    memory_fd: int | None = None
    memory_file_shared: bool = False
    #: Started from a snapshot: the guest's kernel is already in its RAM, so QEMU loads none
    #: (a VM booted with -kernel keeps a 14 MB copy of it for the boot loader, for its whole
    #: life); only the boot loader's option ROM is kept, so the RAM blocks match the template's.
    restored: bool = False
    #: What a VM may grow to by hot-add (vmcache.hotplug); the same as the start size
    #: (no headroom) unless given. Part of the QEMU command line: -smp N,maxcpus=M and
    #: -m SIZE,slots=K,maxmem=MAX.
    max_vcpus: int = attrs.field(default=attrs.Factory(lambda spec: spec.vcpus, takes_self=True))
    max_memory_mib: int = attrs.field(
        default=attrs.Factory(lambda spec: spec.memory_mib, takes_self=True))
    #: How QEMU is confined (vmcache.jail); None: it runs unconfined, as this process's user.
    jail: JailConfig | None = None
    #: A QEMU that cannot apply ``sandbox`` (built without seccomp) is refused
    #: (``jail.allow_no_seccomp`` turns this off).
    require_sandbox: bool = False
    #: Boot with a virtio-net NIC on a tap in QEMU's own network namespace (vmcache.vm_nic),
    #: for a pool that may grant network; off: no NIC at all.
    nic: bool = False

    def __attrs_post_init__(self) -> None:
        if self.max_vcpus < self.vcpus or self.max_memory_mib < self.memory_mib:
            raise ConfigError(
                f"a VM of {self.vcpus} vCPUs and {self.memory_mib} MiB cannot have maxima "
                f"of {self.max_vcpus} vCPUs and {self.max_memory_mib} MiB")


def _converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)

    def strict_int(value: Any, _type: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"must be an integer, not {value!r}")
        return value

    def strict_float(value: Any, _type: type) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"must be a number, not {value!r}")
        return float(value)

    def strict_bool(value: Any, _type: type) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, not {value!r}")
        return value

    def strict_str(value: Any, _type: type) -> str:
        if not isinstance(value, str):
            raise TypeError(f"must be a string, not {value!r}")
        return value

    def strict_strings(value: Any, _type: type) -> tuple[str, ...]:
        if not isinstance(value, list | tuple):  # a lone string is not a list of one
            raise TypeError(f"must be a list of strings, not {value!r}"[:200])
        return tuple(strict_str(item, str) for item in value)

    converter.register_structure_hook_func(lambda type_: type_ == tuple[str, ...], strict_strings)
    converter.register_structure_hook(int, strict_int)
    converter.register_structure_hook(float, strict_float)
    converter.register_structure_hook(str, strict_str)
    converter.register_structure_hook(bool, strict_bool)
    return converter


_CONVERTER = _converter()


def _describe(error: BaseException, _type: Any) -> str:
    if isinstance(error, _RangeError):
        return f"{error.key}={error}"  # validators run per class: _readable adds the key
    if isinstance(error, TypeError):
        return str(error)
    if isinstance(error, cattrs.ForbiddenExtraKeysError):
        return f"unknown key {', '.join(sorted(error.extra_fields))}"
    if isinstance(error, KeyError):
        return "required key missing"
    return str(error) or type(error).__name__


def _readable(line: str) -> str:
    """``must be ... @ $.hypervisor.qemu.x`` -> ``hypervisor.qemu.x: must be ...``."""
    message, _, where = line.rpartition(" @ ")
    key = re.sub(r"\['([^']*)'\]", r".\1", where.removeprefix("$")).lstrip(".")
    if message.startswith("unknown key "):
        names = message.removeprefix("unknown key ")
        qualified = ", ".join(f"{key}.{name}" if key else name for name in names.split(", "))
        return f"unknown key {qualified}"
    name, equals, rule = message.partition("=")
    if equals and name.isidentifier():
        key = f"{key}.{name}" if key else name
        message = rule
    return f"{key}: {message}" if key else message


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    """Structure a parsed TOML document, or raise a ConfigError naming the key."""
    try:
        config = _CONVERTER.structure(data, Config)
    except cattrs.ClassValidationError as error:
        lines = [_readable(line) for line in cattrs.transform_error(error, format_exception=_describe)]
        raise ConfigError(f"{source}: {'; '.join(lines)}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {error}") from None
    return attrs.evolve(config, source=source)


def load_config(path: Path | str | None) -> Config:
    """Read the config file at ``path``; None gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    if "source" in data:
        raise ConfigError(f"{path}: unknown key source")
    return config_from_dict(data, str(path))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)


def render_toml(config: Config) -> str:
    """The effective config as TOML, every key with its value (defaults filled in)."""
    lines = []
    sections: list[tuple[str, Any]] = [("factory", config.factory), ("hypervisor.qemu", config.qemu),
                                       ("image", config.image), ("jail", config.jail),
                                       ("network", config.network), ("e2b", config.e2b)]
    for pool_name, pool in sorted(config.pools.items()):
        sections.append((f"pools.{pool_name}", pool))
        if pool.network is not None:
            sections.append((f"pools.{pool_name}.network", pool.network))
    for name, section in sections:
        lines.append(f"[{name}]")
        for field in attrs.fields(type(section)):
            value = getattr(section, field.name)
            if value is not None and not attrs.has(type(value)):  # None: unset (TOML has no null)
                lines.append(f"{field.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _existing_file(value: str, what: str, source: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        where = f" (from {source})" if source else ""
        raise ConfigError(f"{what} not found: {path}{where}")
    return path


def resolve_spec(config: Config, run_root: Path | None = None) -> VMSpec:
    """Turn a config into a :class:`VMSpec`, checking that every file it names exists.

    An unset kernel or initrd means the default guest image; if that is not
    built yet, the error says how to build it.
    """
    qemu = config.qemu
    binary = shutil.which(qemu.path) if os.sep not in qemu.path else qemu.path
    if binary is None or not os.access(binary, os.X_OK):
        raise ConfigError(
            f"QEMU binary not found: {qemu.path} "
            "(apt-get install qemu-system-x86, or set hypervisor.qemu.path)"
        )
    image_dir = default_image_dir()

    def pick(value: str, default: Path, what: str) -> Path:
        if value:
            return _existing_file(value, what, config.source)
        if not default.is_file():
            raise ConfigError(
                f"default guest image missing: {default} (run `vmcache image build`, "
                f"or set hypervisor.qemu.{what})"
            )
        return default

    kernel = pick(qemu.kernel, image_dir / KERNEL_FILE, "kernel")
    initrd = pick(qemu.initrd, image_dir / INITRD_FILE, "initrd")
    manifest = read_manifest(image_dir) if not (qemu.kernel and qemu.initrd) else None
    image_name = image_id(manifest) if manifest is not None else ""
    rootfs = _root_image(qemu, image_dir, manifest, config.source)
    if rootfs is None:
        _check_initrd_runs_agent(initrd, config.source)
    check_network_privilege(config, os.geteuid())
    if not qemu.seccompsandbox and not config.jail.allow_no_seccomp:
        raise ConfigError("hypervisor.qemu.seccompsandbox is empty: QEMU would run without its "
                          "seccomp filter; set jail.allow_no_seccomp = true to allow that")
    return VMSpec(
        qemu=Path(binary),
        kernel=kernel,
        initrd=initrd,
        kernel_params=qemu.kernel_params,
        machine_type=qemu.machine_type,
        vcpus=qemu.default_vcpus,
        memory_mib=qemu.default_memory,
        accel=qemu.accel,
        boot_timeout=qemu.boot_timeout,
        kvm_probe_timeout=qemu.kvm_probe_timeout,
        require_hardware_accel=qemu.require_hardware_accel,
        run_root=run_root if run_root is not None else default_run_dir(),
        image=image_name,
        rootfs=rootfs,
        # Whether this QEMU supports it is asked at start (vmcache.qemu_binary.usable_spec).
        sandbox=qemu.seccompsandbox,
        tb_size_mib=qemu.tb_size,
        max_vcpus=max_vcpus(qemu),
        max_memory_mib=max_memory_mib(qemu),
        jail=_jail(config),
        require_sandbox=not config.jail.allow_no_seccomp,
        nic=config.network.needs_nic,
    )


def check_network_privilege(config: Config, euid: int) -> None:
    """A pool whose VMs can be granted network needs a root daemon (it makes a tap device in
    each VM's network namespace) and the jail (that namespace is the jail's): ConfigError
    otherwise, at start rather than at the first hand-out."""
    for shape in config.pool_shapes():
        if not shape.network.needs_nic:
            continue
        key = "network" if shape.name == DEFAULT_POOL else f"pools.{shape.name}.network"
        why = (f"[{key}] can grant network (mode restricted or a non-empty permit)")
        if euid != 0:
            raise ConfigError(f"{why}: restricted networking needs root (the daemon makes each "
                              "VM's tap device); run vmcache serve as root, or set mode = \"none\" "
                              "and permit = []")
        if not config.jail.enabled:
            raise ConfigError(f"{why}: restricted networking needs the jail (each VM's network "
                              "namespace is its jail's); set jail.enabled = true")


def _jail(config: Config) -> JailConfig | None:
    """The jail every QEMU gets, once its tools are known to be there (None: disabled)."""
    if not config.jail.enabled:
        return None
    needed = ["bwrap"] + (["setpriv"] if os.geteuid() == 0 else [])
    for tool in needed:
        if shutil.which(tool) is None:
            package = "bubblewrap" if tool == "bwrap" else "util-linux"
            raise ConfigError(f"{tool} not found: it confines every QEMU (apt-get install {package}), "
                              "or set jail.enabled = false to run QEMU unconfined")
    return config.jail


def max_vcpus(qemu: QemuConfig) -> int:
    """``default_maxvcpus``, with Kata's 0 meaning the host's CPUs (never fewer than
    ``default_vcpus``)."""
    if qemu.default_maxvcpus:
        return qemu.default_maxvcpus
    return max(qemu.default_vcpus, min(os.cpu_count() or 1, MAX_VCPUS))


def max_memory_mib(qemu: QemuConfig) -> int:
    """``default_maxmemory``, with Kata's 0 meaning the host's RAM (rounded down to
    ``default_memory`` plus whole hot-add steps, never below ``default_memory``)."""
    if qemu.default_maxmemory:
        return qemu.default_maxmemory
    host_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    steps = max(host_mib - qemu.default_memory, 0) // MEMORY_HOTPLUG_STEP_MIB
    return qemu.default_memory + steps * MEMORY_HOTPLUG_STEP_MIB


def _root_image(qemu: QemuConfig, image_dir: Path, manifest: dict[str, object] | None,
                source: str) -> Path | None:
    """The root filesystem image to attach, or None when the initramfs is the root.

    ``image`` names one; unset, the default image's goes with the default initramfs
    (whose ``/init`` mounts it), and a config's own initrd gets none.
    """
    if qemu.image:
        return _existing_file(qemu.image, "root filesystem image", source)
    if qemu.initrd or manifest is None or not manifest.get("rootfs"):
        return None
    default = image_dir / ROOTFS_FILE
    if not default.is_file():
        raise ConfigError(
            f"default root filesystem image missing: {default} (run `vmcache image build`, "
            "or set hypervisor.qemu.image)"
        )
    return default


#: What an initramfs must carry to run the agent without a root image.
_AGENT_NEEDS = ("usr/bin/python3", f"{AGENT_DIR}/vmcache_agent.py", f"{AGENT_DIR}/agent_protocol.py",
                *(f"{AGENT_DIR}/{name}" for name, _ in AGENT_FILES
                  if name not in ("vmcache_agent.py", "agent_protocol.py")
                  and name not in dict(HELPER_FILES)))
_INITRD_CHECKS: dict[tuple[str, int, int], list[str]] = {}


def initrd_missing(initrd: Path) -> list[str]:
    """What ``initrd`` lacks of :data:`_AGENT_NEEDS` (symlinks followed); remembered per file version."""
    try:
        info = initrd.stat()
        key = (str(initrd), info.st_size, info.st_mtime_ns)
        if key not in _INITRD_CHECKS:
            members = read_initrd(initrd.read_bytes())
            _INITRD_CHECKS[key] = [
                f"/{need}" for need in _AGENT_NEEDS
                if (entry := resolve_path(members, need)) is None or entry.kind != S_IFREG
            ]
    except OSError as error:
        raise ConfigError(f"cannot read the initrd {initrd}: {error.strerror}") from None
    except ImageError as error:
        raise ConfigError(f"cannot read the initrd {initrd}: {error}") from None
    return _INITRD_CHECKS[key]


def _check_initrd_runs_agent(initrd: Path, source: str) -> None:
    missing = initrd_missing(initrd)
    if missing:
        where = f" (from {source})" if source else ""
        raise ConfigError(
            f"no root filesystem image, and the initrd {initrd} cannot run the guest agent "
            f"itself: it has no {' and no '.join(missing)}{where}. Set hypervisor.qemu.image "
            "to an image with python3 >= 3.9, or put python3 and vmcache's agent "
            f"(/{AGENT_DIR}/) into the initramfs"
        )

