"""A real install: the built wheel (not an editable checkout) checks, renders the service, serves.

The wheel is built from a copy of the source tree (so the build leaves nothing in the checkout)
and installed with `--no-deps` into a fresh venv that sees the shared venv's packages through a
`.pth` file: nothing is downloaded, and every `opta_lmx` file the commands read must have come
from the wheel. The commands run from a directory outside the repo, without PYTHONPATH.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from tests.lmx_harness import REPO, Server, free_port, stop_and_check

pytestmark = pytest.mark.e2e


def run(*command, env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, cwd=cwd,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, env, outside): a venv holding only the opta-lmx wheel, its env and a working dir."""
    root = tmp_path_factory.mktemp("installed")
    build_env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build_env.pop("PYTHONPATH", None)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True, timeout=30).stdout.splitlines()
    source = root / "src"
    for name in listed:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", source,
        env=build_env, cwd=root)
    (wheel,) = (root / "dist").glob("opta_lmx-*.whl")

    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, env=build_env, cwd=root)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    env=build_env, cwd=root).stdout.strip())
    # A plain path line: the shared venv's own .pth files (its editable opta_lmx) are not run.
    (site / "shared-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(python, "-m", "pip", "install", "--no-deps", wheel, env=build_env, cwd=root)

    outside = root / "outside"
    outside.mkdir()
    env = {**build_env, "HOME": str(root / "home"), "HF_HUB_OFFLINE": "1",
           "LMX_CONFIG_DIR": str(root / "config"), "LMX_CACHE_DIR": str(root / "cache")}
    return venv, env, outside


def test_the_installed_package_is_the_wheel(installed):
    venv, env, outside = installed
    where = run(venv / "bin" / "python", "-c", "import opta_lmx; print(opta_lmx.__file__)", env=env, cwd=outside)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    assert (venv / "bin" / "lmx").exists()


def test_installed_check_and_service_templates(installed, tiny_model):
    venv, env, outside = installed
    config = outside / "models.yaml"
    config.write_text(f"models:\n  - name: tiny\n    source: {tiny_model}\n")
    assert "ok: 1 model(s)" in run(venv / "bin" / "lmx", "check", "-f", config, env=env, cwd=outside).stdout

    if sys.platform.startswith("linux"):
        unit = run(venv / "bin" / "lmx", "service", "install", "-f", config, "--dry-run", env=env, cwd=outside).stdout
        assert f"ExecStart={venv}/bin/python -m opta_lmx.cli" in unit and f"--file {config}" in unit
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from opta_lmx.cli.service import ServiceSettings, render_plist, render_unit
        settings = ServiceSettings(config=Path({str(config)!r}))
        sys.stdout.buffer.write(render_plist(settings))
        render_unit(settings)
    """)
    plist = plistlib.loads(run(venv / "bin" / "python", "-c", script, env=env, cwd=outside).stdout.encode())
    assert plist["Label"] == "com.opta.lmx"
    assert plist["ProgramArguments"][0] == str(venv / "bin" / "python")
    assert str(config) in plist["ProgramArguments"]


def test_installed_serve_answers(installed, tiny_model, tmp_path):
    venv, env, outside = installed
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  - name: tiny\n    source: {tiny_model}\n    state: loaded\n")
    state_dir, port = tmp_path / "state", free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([venv / "bin" / "lmx", "serve", "-f", config, "--port", str(port), "--state-dir",
                                 state_dir, "--grace", "5"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=outside)
    server = Server(config, state_dir, port, proc, log_path)
    try:
        server.wait_ready("tiny", timeout=90)
        answer = server.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] is not None
        page = server.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()  # the dashboard is package data too
    finally:
        stop_and_check(server)
