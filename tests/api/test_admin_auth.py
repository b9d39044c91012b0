"""Keys: where they come from, what they guard, and the refusal to listen openly without them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from opta_lmx.api.auth import KeyConfigError, Keys, check_bind, is_loopback, load_keys, presented_keys
from opta_lmx.cli.client import ClientError
from opta_lmx.cli.remote import parse_assignments
from tests.lmx_harness import REPO, lmx_env


def test_keys_from_environment_or_files(tmp_path):
    assert load_keys({}) == Keys(None, None)
    key_file = tmp_path / "admin.key"
    key_file.write_text("from-file\n")
    key_file.chmod(0o600)
    keys = load_keys({"LMX_ADMIN_KEY_FILE": str(key_file), "LMX_API_KEY": "inline"})
    assert keys == Keys(admin="from-file", inference="inline")
    with pytest.raises(KeyConfigError, match="cannot read"):
        load_keys({"LMX_API_KEY_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "empty").chmod(0o600)
    with pytest.raises(KeyConfigError, match="empty"):
        load_keys({"LMX_API_KEY_FILE": str(tmp_path / "empty")})


def test_a_key_file_readable_by_others_is_refused_with_the_fix(tmp_path):
    key_file = tmp_path / "api.key"
    key_file.write_text("secret\n")
    for mode in (0o644, 0o640, 0o604):
        key_file.chmod(mode)
        with pytest.raises(KeyConfigError, match=f"chmod 600 {key_file}"):
            load_keys({"LMX_API_KEY_FILE": str(key_file)})
    key_file.chmod(0o400)
    assert load_keys({"LMX_API_KEY_FILE": str(key_file)}).inference == "secret"


def test_admin_and_inference_keys_are_separate():
    keys = Keys(admin="A", inference="I")
    assert keys.admin_ok("A") and not keys.admin_ok("I") and not keys.admin_ok(None)
    assert keys.inference_ok("I") and keys.inference_ok("A") and not keys.inference_ok("x")
    assert Keys(admin="A").inference_ok(None)  # no inference key set: inference is open
    assert presented_keys({"authorization": "Bearer k1", "x-admin-key": "k2"}) == ["k1", "k2"]


def test_non_loopback_needs_both_keys():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    check_bind("127.0.0.1", Keys())
    check_bind("0.0.0.0", Keys("a", "b"))
    with pytest.raises(KeyConfigError, match="LMX_API_KEY"):
        check_bind("0.0.0.0", Keys(admin="a"))


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text("models: []\n")
    env = lmx_env()
    for name in ("LMX_ADMIN_KEY", "LMX_API_KEY", "LMX_ADMIN_KEY_FILE", "LMX_API_KEY_FILE"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "opta_lmx.cli", "serve", "--config", str(config), "--host", "0.0.0.0",
         "--port", "1", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0" in done.stderr and "LMX_ADMIN_KEY" in done.stderr


def test_set_assignments_become_a_merge_patch():
    assert parse_assignments(["priority=5", "engine.max_tokens=64", "pinned=true", "aliases=[a, b]",
                              "memory=null", "idle_ttl=30m"]) == {
        "priority": 5, "engine": {"max_tokens": 64}, "pinned": True, "aliases": ["a", "b"],
        "memory": None, "idle_ttl": "30m",
    }
    with pytest.raises(ClientError):
        parse_assignments(["novalue"])


def _serve_in_process(monkeypatch, app):
    """Route the lmx client's HTTP to `app` in this process (TestClient is an httpx.Client)."""
    from fastapi.testclient import TestClient

    from opta_lmx.cli.client import AdminClient

    monkeypatch.setattr(AdminClient, "_http", lambda self: TestClient(app, base_url=self.server,
                                                                       headers=self.headers()))


def test_the_lmx_client_reads_the_admin_key_file_as_the_server_does(tmp_path, monkeypatch, capsys):
    """The bug: `lmx get` ignored LMX_ADMIN_KEY_FILE (which the server honours) and got 401."""
    from opta_lmx.api.auth import KeyAuth
    from opta_lmx.cli import main
    from opta_lmx.state.store import ModelsStore
    from tests.api.fake_loop import FakeLoop, admin_app

    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - name: alpha\n    source: org/alpha\n")
    key_file = tmp_path / "admin.key"
    key_file.write_text("key-in-a-file\n")
    key_file.chmod(0o600)
    app = admin_app(FakeLoop(config), ModelsStore(config))
    app.add_middleware(KeyAuth, keys=Keys(admin="key-in-a-file", inference="api"))
    _serve_in_process(monkeypatch, app)
    monkeypatch.delenv("LMX_ADMIN_KEY", raising=False)
    monkeypatch.setenv("LMX_ADMIN_KEY_FILE", str(key_file))

    assert main(["get", "models", "--server", "http://lmx.test"]) == 0
    assert "alpha" in capsys.readouterr().out
    monkeypatch.setenv("LMX_ADMIN_KEY_FILE", str(tmp_path / "missing.key"))
    assert main(["get", "models", "--server", "http://lmx.test"]) == 1
    assert "LMX_ADMIN_KEY_FILE" in capsys.readouterr().err
    monkeypatch.delenv("LMX_ADMIN_KEY_FILE")
    assert main(["get", "models", "--server", "http://lmx.test"]) == 1  # no key: the server says 401
    assert "HTTP 401" in capsys.readouterr().err


def test_lmx_plan_uses_the_same_client_and_key_file(tmp_path, monkeypatch, capsys):
    from opta_lmx.api.auth import KeyAuth
    from opta_lmx.cli import main
    from opta_lmx.state.store import ModelsStore
    from tests.api.fake_loop import FakeLoop, admin_app

    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - name: alpha\n    source: org/alpha\n    state: unloaded\n")
    key_file = tmp_path / "admin.key"
    key_file.write_text("plan-key")
    key_file.chmod(0o600)
    app = admin_app(FakeLoop(config), ModelsStore(config))
    app.add_middleware(KeyAuth, keys=Keys(admin="plan-key", inference="api"))
    _serve_in_process(monkeypatch, app)
    monkeypatch.delenv("LMX_ADMIN_KEY", raising=False)
    monkeypatch.setenv("LMX_ADMIN_KEY_FILE", str(key_file))
    assert main(["plan", "--server", "http://lmx.test", "--config", str(config)]) == 0
    assert "against http://lmx.test" in capsys.readouterr().out
    monkeypatch.delenv("LMX_ADMIN_KEY_FILE")
    assert main(["plan", "--server", "http://lmx.test", "--config", str(config)]) == 2  # 401, server given
    assert "cannot read http://lmx.test/admin/models" in capsys.readouterr().err
