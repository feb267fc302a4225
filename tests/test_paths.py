"""Places on the host that another user may have prepared for us: never followed, never trusted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmcache import paths, safefile
from vmcache.accel import AccelChooser
from vmcache.errors import ConfigError
from vmcache.lifecycle import VMLife
from vmcache.state import VMRegistry


@pytest.fixture
def fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where ``/tmp/vmcache-$UID`` would be for a user of uid 4242 with no XDG_RUNTIME_DIR."""
    monkeypatch.delenv("VMCACHE_RUN_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(paths, "FALLBACK_RUN_PARENT", tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    return tmp_path / "vmcache-4242"


def test_a_fallback_run_directory_not_made_by_us_is_refused(fallback: Path) -> None:
    assert paths.default_run_dir() == fallback  # not there yet: ours to make

    fallback.mkdir(mode=0o700)
    os.chown(fallback, 65534, 65534)  # another user made it first
    with pytest.raises(ConfigError, match="belongs to uid 65534 with mode 0700, not to uid 4242"):
        paths.default_run_dir()

    os.chown(fallback, 4242, 4242)
    os.chmod(fallback, 0o777)  # ours, but open to anyone
    with pytest.raises(ConfigError, match="mode 0777"):
        paths.default_endpoint()

    os.chmod(fallback, 0o700)
    assert paths.default_run_dir() == fallback

    fallback.rmdir()
    elsewhere = fallback.parent / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.chown(elsewhere, 4242, 4242)
    fallback.symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="is not a directory"):
        paths.default_run_dir()


def test_the_cli_says_so_in_one_line(fallback: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vmcache import cli

    fallback.mkdir(mode=0o755)
    os.chown(fallback, 4242, 4242)
    with pytest.raises(SystemExit) as exited:
        cli._exit_for(_raised(lambda: paths.default_endpoint()))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mode 0755" in err and "XDG_RUNTIME_DIR" in err


def _raised(action: object) -> BaseException:
    try:
        action()  # type: ignore[operator]
    except BaseException as error:
        return error
    raise AssertionError("no error")


def test_a_symlinked_record_is_replaced_never_followed(tmp_path: Path) -> None:
    registry = VMRegistry(tmp_path / "state" / "x", tmp_path)
    registry.prepare()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, registry.path / "vm-0123456789ab.json")
    # Nor a temporary name a writer would use (a fixed one was: now fresh, and O_EXCL).
    os.symlink(victim, registry.path / ".vm-0123456789ab.partial")
    registry.write(VMLife("0123456789ab", 1, 2))
    assert victim.read_text() == "precious"
    assert not (registry.path / "vm-0123456789ab.json").is_symlink()
    assert json.loads((registry.path / "vm-0123456789ab.json").read_text())["pid"] == 1

    # A symlink among the records is not read through (nor its target removed): it is dropped,
    # even when it points to a well-formed record.
    victim.write_text(json.dumps({"id": "ba9876543210", "pid": 1, "start_time": 1}))
    os.symlink(victim, registry.path / "vm-ba9876543210.json")
    assert [record.id for record in registry.load()] == ["0123456789ab"]
    assert not os.path.lexists(registry.path / "vm-ba9876543210.json")
    assert victim.exists()
    registry.remove("0123456789ab")
    assert registry.load() == []


def test_a_state_directory_that_is_a_symlink_or_not_ours_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (tmp_path / "state").mkdir()
    os.symlink(theirs, tmp_path / "state" / "x")
    with pytest.raises(ConfigError, match="is not a directory"):
        VMRegistry(tmp_path / "state" / "x", tmp_path).prepare()

    os.chown(theirs, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        VMRegistry(theirs, tmp_path).prepare()
    # And a writer that finds it so later (swapped after prepare) writes nothing there.
    with pytest.raises(safefile.UnsafePathError):
        safefile.write_atomic(theirs, "vm-0123456789ab.json", b"{}")
    assert list(theirs.iterdir()) == []


def test_the_kvm_probe_verdict_is_not_written_through_a_symlink(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    probe = state / "kvm-probe.json"
    os.symlink(victim, probe)
    chooser = AccelChooser(probe)
    assert chooser._read_cache({"k": 1}) is None  # not read through the link either
    chooser._write_cache({"k": 1}, False, "the probe guest hung")
    assert victim.read_text() == "precious"
    assert not probe.is_symlink()
    verdict = chooser._read_cache({"k": 1})
    assert verdict is not None and verdict.accel == "tcg"

    fifo = state / "fifo.json"
    os.mkfifo(fifo)
    assert AccelChooser(fifo)._read_cache({"k": 1}) is None  # a FIFO cannot hang a reader
