"""One settings object for defaults and LMX_* variables."""

from __future__ import annotations

import pytest

from opta_lmx import paths, settings


def test_defaults_and_the_environment():
    default = settings.Settings.from_env({})
    assert (default.host, default.port) == ("127.0.0.1", 1234)
    assert default.server_url == "http://127.0.0.1:1234"
    assert default.log_level == "INFO" and default.git_commit is False
    given = settings.Settings.from_env({"LMX_SERVER": "http://box:9", "LMX_GIT_COMMIT": "yes",
                                        "LMX_LOG_LEVEL": "DEBUG", "LMX_ADMIN_KEY": " k "})
    assert given.server_url == "http://box:9" and given.git_commit is True and given.log_level == "DEBUG"
    assert given.admin_secret() == "k"


def test_key_files(tmp_path):
    key = tmp_path / "admin.key"
    key.write_text("from-file\n")
    key.chmod(0o644)
    with pytest.raises(settings.SecretFileError, match="chmod 600"):
        settings.Settings.from_env({"LMX_ADMIN_KEY_FILE": str(key)}).admin_secret()
    key.chmod(0o600)
    assert settings.Settings.from_env({"LMX_ADMIN_KEY_FILE": str(key)}).admin_secret() == "from-file"
    with pytest.raises(settings.SecretFileError, match="cannot read"):
        settings.Settings.from_env({"LMX_API_KEY_FILE": str(tmp_path / "none")}).api_secret()


def test_paths_follow_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("LMX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LMX_CONFIG_DIR", str(tmp_path / "config"))
    assert paths.state_dir() == tmp_path / "state"
    assert paths.state_dir(tmp_path / "flag") == tmp_path / "flag"
    assert paths.default_config_path() == tmp_path / "config" / "models.yaml"


def test_lmx_defaults_come_from_the_settings(monkeypatch):
    from opta_lmx.cli import build_parser

    monkeypatch.setenv("LMX_LOG_FORMAT", "json")
    monkeypatch.setenv("LMX_GIT_COMMIT", "1")
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.log_format, args.git_commit) == ("127.0.0.1", 1234, "json", True)
