"""`lmx service`: the rendered plist and unit, and the launchctl/systemctl command lines.

No service manager runs here: `run_command` (the module's one subprocess boundary) is
replaced by a recorder, so these tests check exactly what would be run, on Linux and macOS.
"""

from __future__ import annotations

import os
import plistlib
import stat
from pathlib import Path

import pytest

from opta_lmx.cli import service
from opta_lmx.cli import main
from opta_lmx.cli.service import LABEL, ServiceError, ServiceSettings, render_plist, render_unit


@pytest.fixture(autouse=True)
def no_keys_here(monkeypatch):
    """The keys of whoever runs the tests must not leak into (or be refused by) these installs."""
    for variable in ("LMX_ADMIN_KEY", "LMX_API_KEY", "LMX_ADMIN_KEY_FILE", "LMX_API_KEY_FILE"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def settings(tmp_path) -> ServiceSettings:
    config = tmp_path / "my models" / "models.yaml"  # a space: quoting must hold
    config.parent.mkdir()
    config.write_text("models: []\n")
    return ServiceSettings(config=config, python=Path("/opt/lmx/venv/bin/python"), port=4321, grace=12.5,
                           state_dir=tmp_path / "state", log_dir=tmp_path / "Logs" / "opta-lmx",
                           env={"HF_HOME": "/Volumes/models/hf"})


@pytest.fixture
def commands(monkeypatch):
    """Record every command line instead of running it. launchctl is simulated just enough:
    `print` fails (113) unless loaded, `bootstrap` of a loaded job fails (5) as the real one does."""

    class Calls(list):
        loaded = False

    calls = Calls()

    def fake(argv, *, check=True):
        calls.append(list(argv))
        code = 0
        if argv[:2] == ["launchctl", "print"]:
            code = 0 if calls.loaded else 113
        elif argv[:2] == ["launchctl", "bootstrap"]:
            code, calls.loaded = (5, True) if calls.loaded else (0, True)
        elif argv[:2] == ["launchctl", "bootout"]:
            code, calls.loaded = (0 if calls.loaded else 3), False
        if check and code:
            raise ServiceError(f"{argv} failed with {code}")
        return service.subprocess.CompletedProcess(argv, code, "state = running\n" if code == 0 else "", "")

    monkeypatch.setattr(service, "run_command", fake)
    return calls


def test_plist_keys_types_and_absolute_paths(settings):
    plist = plistlib.loads(render_plist(settings))
    assert plist["Label"] == LABEL
    args = plist["ProgramArguments"]
    assert all(isinstance(a, str) for a in args)
    assert args[:3] == ["/opt/lmx/venv/bin/python", "-m", "opta_lmx.cli"]
    assert args[args.index("serve") + 1:] == ["--file", str(settings.config), "--host", "127.0.0.1",
                                               "--port", "4321", "--grace", "12.5"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart after a crash, not after a clean stop
    assert type(plist["ThrottleInterval"]) is int and plist["ThrottleInterval"] > 0
    assert type(plist["ExitTimeOut"]) is int and plist["ExitTimeOut"] > 2 * settings.grace
    for key in ("StandardOutPath", "StandardErrorPath", "WorkingDirectory"):
        assert Path(plist[key]).is_absolute(), key
    assert plist["StandardOutPath"] == str(settings.log_dir / "lmx.log")
    env = plist["EnvironmentVariables"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert env["HF_HOME"] == "/Volumes/models/hf"
    assert env["LMX_STATE_DIR"] == str(settings.state_dir) and Path(env["LMX_LOG_DIR"]).is_absolute()
    assert env["PATH"].split(os.pathsep)[0] == "/opt/lmx/venv/bin"
    assert not any("@" in a for a in args)


def test_relative_paths_are_refused(settings):
    with pytest.raises(ServiceError, match="absolute"):
        render_plist(ServiceSettings(config=Path("models.yaml"), state_dir=settings.state_dir,
                                     log_dir=settings.log_dir))


def test_unit_file_rendering(settings):
    unit = render_unit(settings)
    lines = unit.splitlines()
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_start.startswith("ExecStart=/opt/lmx/venv/bin/python -m opta_lmx.cli ")
    assert f'"{settings.config}"' in exec_start  # the space in the path is quoted for systemd
    assert "--port 4321" in exec_start and "--grace 12.5" in exec_start
    assert "Restart=on-failure" in lines
    assert "KillMode=mixed" in lines
    timeout = int(next(line for line in lines if line.startswith("TimeoutStopSec=")).split("=")[1])
    assert timeout > 2 * settings.grace
    assert f"StandardOutput=append:{settings.log_dir / 'lmx.log'}" in lines
    assert "Environment=HF_HOME=/Volumes/models/hf" in lines
    assert "WantedBy=default.target" in lines
    assert "$" not in unit.replace("$$", "")  # every template variable was filled


def test_linux_install_writes_unit_and_drives_systemctl(settings, commands, tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    systemd = service.Systemd(home=tmp_path)
    systemd.install(settings)
    unit_file = tmp_path / ".config" / "systemd" / "user" / "opta-lmx.service"
    assert unit_file.read_text() == render_unit(settings)
    assert commands == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "opta-lmx.service"],
        ["systemctl", "--user", "restart", "opta-lmx.service"],
    ]
    commands.clear()
    systemd.stop()
    systemd.start()
    systemd.uninstall()
    assert commands == [
        ["systemctl", "--user", "stop", "opta-lmx.service"],
        ["systemctl", "--user", "start", "opta-lmx.service"],
        ["systemctl", "--user", "disable", "--now", "opta-lmx.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]
    assert not unit_file.exists()


def test_macos_install_bootstraps_in_the_gui_domain(settings, commands, tmp_path):
    launchd = service.Launchd(home=tmp_path)
    target = f"gui/{os.getuid()}/{LABEL}"
    launchd.install(settings)
    plist_file = tmp_path / "Library" / "LaunchAgents" / "com.opta.lmx.plist"
    assert plistlib.loads(plist_file.read_bytes())["Label"] == LABEL
    assert commands == [
        ["launchctl", "print", target],
        ["launchctl", "bootstrap", f"gui/{os.getuid()}", str(plist_file)],
    ]

    commands.clear()  # loaded now: a reinstall boots the old one out first, and waits until it is gone
    launchd.install(settings)
    assert commands == [
        ["launchctl", "print", target],
        ["launchctl", "bootout", target],
        ["launchctl", "print", target],
        ["launchctl", "bootstrap", f"gui/{os.getuid()}", str(plist_file)],
    ]

    commands.clear()
    launchd.stop()
    launchd.start()
    launchd.uninstall()
    assert commands == [
        ["launchctl", "kill", "SIGTERM", target],
        ["launchctl", "print", target],
        ["launchctl", "kickstart", target],
        ["launchctl", "bootout", target],
    ]
    assert not plist_file.exists()

    commands.clear()  # not loaded (e.g. after a logout): start bootstraps it first
    plist_file.write_bytes(render_plist(settings))
    launchd.start()
    assert [c[1] for c in commands] == ["print", "bootstrap", "kickstart"]


def test_dry_run_prints_and_touches_nothing(settings, commands, tmp_path, capsys):
    launchd = service.Launchd(home=tmp_path, dry_run=True)
    launchd.install(settings)
    out = capsys.readouterr().out
    assert commands == []
    assert not (tmp_path / "Library").exists() and not settings.state_dir.exists()
    assert "<key>KeepAlive</key>" in out
    assert f"would run: launchctl bootstrap gui/{os.getuid()} " in out


def test_cli_install_dry_run(settings, commands, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(service.sys, "platform", "linux")
    code = main(["--log-format", "json", "service", "install", "-f", str(settings.config),
                 "--port", "9999", "--env", "FOO=bar baz", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and commands == []
    assert "would write " + str(tmp_path / "xdg" / "systemd" / "user" / "opta-lmx.service") in out
    assert "--log-format json serve" in out and "--port 9999" in out
    assert 'Environment="FOO=bar baz"' in out
    assert "would run: systemctl --user enable opta-lmx.service" in out


def test_cli_install_refuses_a_missing_config(tmp_path, commands, monkeypatch, capsys):
    monkeypatch.setattr(service.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    code = main(["service", "install", "-f", str(tmp_path / "nope.yaml")])
    assert code == 1 and commands == []
    assert "no models.yaml at" in capsys.readouterr().err


def test_cli_install_warns_about_an_invalid_config(tmp_path, commands, monkeypatch, capsys):
    monkeypatch.setattr(service.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - name: a\n    source: x\n    state: sometimes\n")
    assert main(["service", "install", "-f", str(bad), "--dry-run"]) == 0
    assert "models[0].state" in capsys.readouterr().err


def _key_file(path: Path, key: str, mode: int = 0o600) -> Path:
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("system", ["linux", "darwin"])
def test_install_carries_key_files_never_key_values(settings, commands, tmp_path, monkeypatch, capsys, system):
    """Issue 12 item 3: the service gets the key files' paths; the keys stay in their files."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(service.sys, "platform", system)
    monkeypatch.chdir(tmp_path)
    admin = _key_file(tmp_path / "admin.key", "admin-secret-value")
    _key_file(tmp_path / "api.key", "api-secret-value")
    monkeypatch.setenv("LMX_ADMIN_KEY_FILE", str(admin))
    code = main(["service", "install", "--config", str(settings.config), "--env", "LMX_API_KEY_FILE=api.key",
                 "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "admin-secret-value" not in out and "api-secret-value" not in out
    assert str(admin) in out and str(tmp_path / "api.key") in out  # relative --env paths made absolute
    if system == "linux":
        assert f"Environment=LMX_ADMIN_KEY_FILE={admin}" in out
    else:
        assert "<key>LMX_API_KEY_FILE</key>" in out


@pytest.mark.parametrize("how", ["--env", "environment"])
def test_a_key_value_is_refused_with_a_pointer_to_key_files(settings, commands, tmp_path, monkeypatch, capsys,
                                                             how):
    monkeypatch.setattr(service.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    argv = ["service", "install", "--config", str(settings.config), "--dry-run"]
    if how == "--env":
        argv += ["--env", "LMX_ADMIN_KEY=admin-secret-value"]
    else:
        monkeypatch.setenv("LMX_API_KEY", "api-secret-value")
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "secret-value" not in captured.out + captured.err and commands == []
    assert "_KEY_FILE=" in captured.err and "chmod 600" in captured.err
    with pytest.raises(ServiceError, match="LMX_ADMIN_KEY_FILE"):
        render_unit(ServiceSettings(config=settings.config, state_dir=settings.state_dir,
                                    log_dir=settings.log_dir, env={"LMX_ADMIN_KEY": "x"}))


def test_a_key_file_others_can_read_or_that_is_missing_is_refused(settings, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(service.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    shared = _key_file(tmp_path / "admin.key", "k", mode=0o644)
    for given, message in ((shared, "chmod 600"), (tmp_path / "nope.key", "cannot read")):
        assert main(["service", "install", "--config", str(settings.config), "--env",
                     f"LMX_ADMIN_KEY_FILE={given}", "--dry-run"]) == 1
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["systemd", "launchd"])
def test_the_service_file_is_readable_by_the_user_only(settings, commands, tmp_path, monkeypatch, kind):
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    platform = service.Systemd(home=tmp_path) if kind == "systemd" else service.Launchd(home=tmp_path)
    platform.file.parent.mkdir(parents=True)
    platform.file.write_text("an older, world-readable install")
    platform.file.chmod(0o644)
    platform.install(settings)
    assert stat.S_IMODE(platform.file.stat().st_mode) == 0o600
