"""`lmx doctor`: each check finds its problem and says how to fix it."""

from __future__ import annotations

import socket

from opta_lmx.cli import doctor


def test_platform_check():
    assert doctor.check_platform("darwin", "arm64").level == doctor.OK
    intel = doctor.check_platform("darwin", "x86_64")
    assert intel.level == doctor.FAIL and "Apple silicon" in intel.detail and intel.fix
    assert doctor.check_platform("linux", "x86_64").level == doctor.WARN


def test_mlx_check_reports_the_device():
    finding = doctor.check_mlx()
    assert finding.level == doctor.OK, finding
    assert "default device" in finding.detail


def test_config_check(tmp_path):
    missing = doctor.check_config(tmp_path / "models.yaml")
    assert missing.level == doctor.WARN and "lmx serve" in missing.fix
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: a\n    source: x\n    state: sometimes\n")
    finding = doctor.check_config(bad)
    assert finding.level == doctor.FAIL and "models[0].state" in finding.detail and "lmx check" in finding.fix
    good = tmp_path / "good.yaml"
    good.write_text("models:\n  - name: a\n    source: x\n")
    assert doctor.check_config(good).level == doctor.OK


def test_port_check_names_a_foreign_listener(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        finding = doctor.check_port("127.0.0.1", port, tmp_path)
        assert finding.level == doctor.FAIL and f"--port {port + 1}" in finding.fix
    assert doctor.check_port("127.0.0.1", port, tmp_path).level == doctor.OK


def test_doctor_command_exit_code(tmp_path, capsys, monkeypatch):
    from opta_lmx.cli import main

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: 3\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        code = main(["doctor", "--config", str(bad), "--port", str(port), "--state-dir", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL config" in out and "fix:" in out
