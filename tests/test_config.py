"""Config parsing and validation, and the one-line errors the CLI makes of them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import attrs
import pytest
from conftest import VMCACHE

from vmcache.config import Config, load_config, render_toml, resolve_spec
from vmcache.errors import ConfigError


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vmcache.toml"
    path.write_text(text)
    return path


def test_defaults_and_kata_key_names(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, """
[factory]
vm_cache_number = 3
vm_cache_endpoint = "/tmp/x.sock"
[hypervisor.qemu]
default_memory = 512
default_vcpus = 2
kernel_params = "loglevel=3"
boot_timeout = 12
"""))
    assert config.factory.vm_cache_number == 3
    assert str(config.endpoint()) == "/tmp/x.sock"
    assert (config.qemu.default_memory, config.qemu.default_vcpus) == (512, 2)
    assert config.qemu.boot_timeout == 12.0
    assert config.qemu.accel == "auto"
    assert config.qemu.require_hardware_accel is False


def test_require_hardware_accel_reaches_the_spec(tmp_path: Path, guest_image: Path) -> None:
    config = load_config(config_file(tmp_path, "[hypervisor.qemu]\nrequire_hardware_accel = true\n"))
    assert config.qemu.require_hardware_accel is True
    assert resolve_spec(config, run_root=tmp_path).require_hardware_accel is True
    assert "require_hardware_accel = true" in render_toml(config)


@pytest.mark.parametrize(("text", "message"), [
    ("[factory]\nvm_cache_nmuber = 2\n", "unknown key factory.vm_cache_nmuber"),
    ("[hypervisor.qemu]\ncolour = 'red'\n", "unknown key hypervisor.qemu.colour"),
    ("[factory]\nvm_cache_number = 'two'\n", "factory.vm_cache_number: must be an integer"),
    ("[factory]\nvm_cache_number = -1\n", "factory.vm_cache_number: must be at least 1"),
    ("[hypervisor.qemu]\ndefault_memory = 0\n", "hypervisor.qemu.default_memory: must be at least 64"),
    ("[hypervisor.qemu]\nboot_timeout = 0\n", "hypervisor.qemu.boot_timeout: must be more than 0"),
    ("[hypervisor.qemu]\naccel = 'xen'\n", "hypervisor.qemu.accel: must be one of auto, kvm, tcg"),
    ('[hypervisor.qemu]\nkernel_params = "a\\nb"\n', "hypervisor.qemu.kernel_params: must be one line"),
    ("[factory\n", "not valid TOML"),
    ("[hypervisor.qemu]\nrequire_hardware_accel = 'yes'\n",
     "hypervisor.qemu.require_hardware_accel: must be true or false, not 'yes'"),
    ("[hypervisor.qemu]\nrequire_hardware_accel = 1\n",
     "hypervisor.qemu.require_hardware_accel: must be true or false, not 1"),
    ("[hypervisor.qemu]\ndefault_vcpus = 2\ndefault_maxvcpus = 1\n",
     "hypervisor.qemu.default_maxvcpus: must be 0 (the host's CPUs) or from default_vcpus (2) to 240"),
    ("[hypervisor.qemu]\ndefault_maxvcpus = 241\n", "hypervisor.qemu.default_maxvcpus: must be 0"),
    ("[hypervisor.qemu]\ndefault_maxmemory = 128\n",
     "hypervisor.qemu.default_maxmemory: must be 0 (the host's RAM) or at least default_memory (256)"),
    ("[hypervisor.qemu]\ndefault_maxmemory = 1000\n",
     "hypervisor.qemu.default_maxmemory: must be default_memory (256) plus a multiple of 128 MiB"),
])
def test_bad_config_names_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    text = f'[hypervisor.qemu]\nkernel = "{missing}"\ninitrd = "{missing}"\n'
    config = load_config(config_file(tmp_path, text))
    with pytest.raises(ConfigError, match=f"kernel not found: {missing}"):
        resolve_spec(config)
    config = load_config(config_file(tmp_path, '[hypervisor.qemu]\npath = "/no/such/qemu"\n'))
    with pytest.raises(ConfigError, match="QEMU binary not found: /no/such/qemu"):
        resolve_spec(config)


def test_default_image_missing_says_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMCACHE_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="vmcache image build"):
        resolve_spec(load_config(None))


@pytest.mark.parametrize(("text", "needle"), [
    ("[factory]\nsize = 2\n", "unknown key factory.size"),
    ('[hypervisor.qemu]\ninitrd = "/no/initrd"\nkernel = "/no/kernel"\n', "kernel not found: /no/kernel"),
    ('[hypervisor.qemu]\npath = "/no/qemu"\n', "QEMU binary not found: /no/qemu"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path: Path, text: str, needle: str) -> None:
    path = config_file(tmp_path, text)
    for command in (["run", "--direct", "--config", str(path), "--", "true"],
                    ["serve", "--config", str(path)]):
        done = subprocess.run([*VMCACHE, *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert needle in done.stderr and "Traceback" not in done.stderr


def test_contrib_sample_is_the_defaults() -> None:
    """contrib/vmcache.toml documents every key with its default: keep the two equal."""
    sample = load_config(Path(__file__).parent.parent / "contrib" / "vmcache.toml")
    assert attrs.evolve(sample, source="") == Config()
    text = (Path(__file__).parent.parent / "contrib" / "vmcache.toml").read_text()
    for line in render_toml(Config()).splitlines():
        if "=" in line:
            assert f"\n{line.split(' = ')[0]} = " in text, line


def test_maxima_default_to_the_host_as_in_kata(tmp_path: Path) -> None:
    """default_maxvcpus = 0 is the host's CPUs, default_maxmemory = 0 its RAM (in 128 MiB
    steps above default_memory); equal maxima mean no headroom."""
    from vmcache.config import max_memory_mib, max_vcpus

    qemu = load_config(config_file(tmp_path, "[hypervisor.qemu]\ndefault_maxmemory = 0\n")).qemu
    assert max_vcpus(qemu) == max(os.cpu_count() or 1, 1)
    host_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    assert host_mib - 128 < max_memory_mib(qemu) <= host_mib
    assert (max_memory_mib(qemu) - 256) % 128 == 0
    qemu = load_config(config_file(tmp_path, "[hypervisor.qemu]\ndefault_vcpus = 300\n"
                                             "default_memory = 300\ndefault_maxmemory = 300\n")).qemu
    assert (max_vcpus(qemu), max_memory_mib(qemu)) == (300, 300)
