"""Issue 13 acceptance: the dashboard in a real headless Chromium against a real `lmx serve`.

Chromium is Debian's (`apt-get install chromium`), driven by Playwright with that executable;
nothing is downloaded. Set LMX_UPDATE_SCREENSHOT=1 to refresh docs/dashboard.png from the run.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.lmx_harness import lmx_env

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("LMX_CHROMIUM", "/usr/bin/chromium")
INSTALL = ("install it with `sudo apt-get install -y chromium` (Debian/Ubuntu) and `pip install playwright` "
           "(never `playwright install`); .ci/run does both")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS = Path(__file__).resolve().parents[2] / "docs"
WAIT_MS = 120_000  # a load or a convergence on a busy 2-core machine


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Chromium (its own profile directory); skips with how to install it."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is missing: " + INSTALL)
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: " + INSTALL)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=FLAGS, headless=True,
            viewport={"width": 1360, "height": 860}, color_scheme="light")
        context.set_default_timeout(WAIT_MS)
        expect.set_options(timeout=WAIT_MS)  # expect() polls; its own default is 5 s
        errors: list[str] = []
        context.on("weberror", lambda error: errors.append(str(error.error)))
        context.errors = errors
        yield context
        context.close()
    assert not errors, f"the page raised: {errors}"


def open_page(browser, server):
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(server.base_url + "/")
    expect(page.locator("#stream")).to_have_text("live")
    return page


def row(page, name):
    return page.locator(f'tr[data-model="{name}"]')


def spec_of(server, name) -> dict:
    document = YAML(typ="safe").load(server.config.read_text())
    return next(m for m in document["models"] if m["name"] == name)


def _two_models(tiny, tiny_b, second_state="unloaded") -> str:
    return (
        "# the dashboard's browser test\n"
        "memory:\n  budget: 90%\n  reserve: 1GiB\n"
        "models:\n"
        f"  - name: chat\n    source: '{tiny}'\n    aliases: [default]\n    priority: 50\n"
        f"  - name: coder\n    source: '{tiny_b}'\n    state: {second_state}\n    idle_ttl: 10m\n"
    )


def test_page_shows_every_model_and_follows_the_file_without_reload(browser, serve, tiny_model, tiny_model_b):
    from playwright.sync_api import expect

    too_big = f"  - name: huge\n    source: '{tiny_model}'\n    memory: 4TiB   # more than any budget here\n"
    broken = f"  - name: broken\n    source: '{tiny_model.parent / 'no-such-model'}'\n"
    server = serve(_two_models(tiny_model, tiny_model_b, "on-demand") + too_big + broken)
    server.wait_ready("chat")
    page = open_page(browser, server)
    expect(row(page, "chat").locator(".phase")).to_have_text("Ready")
    expect(row(page, "coder").locator(".phase")).to_have_text("Unloaded")
    expect(row(page, "coder").locator(".reason")).to_contain_text("on demand")
    expect(row(page, "chat").locator(".aliases")).to_have_text("default")
    expect(row(page, "huge").locator(".phase")).to_have_text("Unschedulable")
    expect(row(page, "huge").locator(".reason")).to_contain_text("Unschedulable: ")
    measured = server.admin_models()["models"][0]["status"]["measured_bytes"]
    assert measured, "the loop measured no memory for chat"
    figures = row(page, "chat").locator(".figures").inner_text()
    assert re.match(r"^\d+(\.\d)? (MiB|GiB) / \d+(\.\d)? (MiB|GiB)", figures), figures
    expect(page.locator("#memory-used")).to_have_text(re.compile(r"\d (MiB|GiB)$"))
    expect(row(page, "broken").locator(".phase")).to_have_text("Failed")
    expect(row(page, "broken").locator(".reason")).to_contain_text("Failed: ")
    expect(page.locator("#converged")).to_have_text("Not converged: huge is Unschedulable, broken is Failed")
    expect(page.locator("#events li").first).to_be_visible()

    marker = page.evaluate("window.__sameDocument = true")  # survives only if the page is not reloaded
    text = server.config.read_text() + f"  - name: extra\n    source: '{tiny_model}'\n    state: unloaded\n"
    server.write_config(text)
    expect(row(page, "extra").locator(".phase")).to_have_text("Unloaded")
    expect(row(page, "extra").locator(".desired")).to_have_text("unloaded")
    assert page.evaluate("window.__sameDocument") is True, marker

    page.locator("#log-model").select_option("chat")
    expect(page.locator("#log")).to_contain_text("GET /health")
    page.locator("body").click(position={"x": 5, "y": 5})
    page.screenshot(path=str(server.state_dir.parent / "dashboard.png"), full_page=True)
    if os.environ.get("LMX_UPDATE_SCREENSHOT"):
        shutil.copy(server.state_dir.parent / "dashboard.png", DOCS / "dashboard.png")


def test_unload_button_writes_unloaded_and_the_page_shows_it_unloaded(browser, serve, tiny_model, tiny_model_b):
    from playwright.sync_api import expect

    server = serve(_two_models(tiny_model, tiny_model_b))
    server.wait_ready("chat")
    page = open_page(browser, server)
    expect(row(page, "chat").locator(".phase")).to_have_text("Ready")
    page.locator("#unload-chat").focus()
    page.keyboard.press("Enter")  # keyboard only
    expect(page.locator("#edit-diff")).to_contain_text("+    state: unloaded")
    assert spec_of(server, "chat").get("state") is None, "the preview must not write"
    expect(page.locator("#edit-apply")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#edit-result")).to_contain_text("converged: chat is Unloaded")
    assert spec_of(server, "chat")["state"] == "unloaded"
    assert "# the dashboard's browser test" in server.config.read_text()
    page.keyboard.press("Escape")
    expect(row(page, "chat").locator(".phase")).to_have_text("Unloaded")
    expect(row(page, "chat").locator(".desired")).to_have_text("unloaded")
    expect(page.locator("#events")).to_contain_text("AdminEdit")


def test_a_stale_edit_shows_the_conflict_and_retries_on_the_fresh_file(browser, serve, tiny_model, tiny_model_b):
    from playwright.sync_api import expect

    server = serve(_two_models(tiny_model, tiny_model_b).replace("priority: 50\n", "priority: 50\n    state: unloaded\n"))
    page = open_page(browser, server)
    expect(row(page, "chat").locator(".phase")).to_have_text("Unloaded")
    page.locator("#priority-chat").fill("7")
    page.locator("#set-priority-chat").click()
    expect(page.locator("#edit-diff")).to_contain_text("+    priority: 7")

    # Someone else saves the file while the diff is on screen.
    server.write_config(server.config.read_text().replace("# the dashboard's", "# edited by hand: the dashboard's"))
    page.locator("#edit-apply").click()
    expect(page.locator("#edit-result")).to_contain_text("Conflict (412)")
    assert spec_of(server, "chat")["priority"] == 50, "a stale edit must write nothing"
    expect(page.locator("#events")).to_contain_text("generation 2")  # the page saw the hand edit...
    expect(page.locator("#priority-chat")).to_have_value("7")  # ...and its re-render kept what was typed

    page.locator("#edit-retry").click()
    expect(page.locator("#edit-diff")).to_contain_text("+    priority: 7")
    page.locator("#edit-apply").click()
    expect(page.locator("#edit-result")).to_contain_text("converged")
    assert spec_of(server, "chat")["priority"] == 7
    assert "# edited by hand" in server.config.read_text()  # the other writer's change survived
    page.keyboard.press("Escape")
    expect(row(page, "chat").locator(".desired + .sub")).to_contain_text("priority 7")


def test_with_an_admin_key_the_page_asks_once_and_keeps_it_for_the_tab(browser, tmp_path, tiny_model, tiny_model_b):
    from playwright.sync_api import expect

    from tests.lmx_harness import start_server, stop_and_check

    config = tmp_path / "models.yaml"
    config.write_text(_two_models(tiny_model, tiny_model_b).replace("priority: 50\n", "priority: 50\n    state: unloaded\n"))
    server = start_server(config, tmp_path / "state", env=lmx_env(LMX_ADMIN_KEY="dash-admin-key"))
    try:
        page = browser.new_page()
        page.goto(server.base_url + "/")
        expect(page.locator("#key-dialog")).to_be_visible()
        page.locator("#key-input").fill("dash-admin-key")
        page.keyboard.press("Enter")
        expect(row(page, "coder").locator(".phase")).to_have_text("Unloaded")
        expect(page.locator("#stream")).to_have_text("live")
        assert page.evaluate("sessionStorage.getItem('lmx-admin-key')") == "dash-admin-key"
        assert page.evaluate("localStorage.length") == 0
        page.reload()
        expect(row(page, "chat").locator(".phase")).to_have_text("Unloaded")
        expect(page.locator("#key-dialog")).to_be_hidden()  # asked once per tab
    finally:
        stop_and_check(server)


def test_moving_an_alias_loads_the_target_first_then_moves_it(browser, serve, tiny_model, tiny_model_b):
    from playwright.sync_api import expect

    server = serve(_two_models(tiny_model, tiny_model_b))
    server.wait_ready("chat")
    page = open_page(browser, server)
    page.locator("#alias-name").fill("default")
    page.locator("#alias-to").select_option("coder")
    page.locator("#alias-unload").check()
    page.locator("#alias-form button[type=submit]").click()
    expect(page.locator("#edit-summary")).to_contain_text("move alias default to coder from chat")
    expect(page.locator("#edit-diff")).to_contain_text("+    aliases: []")
    page.locator("#edit-apply").click()
    expect(page.locator("#edit-result")).to_contain_text("converged: coder is Ready")
    assert spec_of(server, "coder")["aliases"] == ["default"] and spec_of(server, "coder")["state"] == "loaded"
    assert spec_of(server, "chat")["aliases"] == [] and spec_of(server, "chat")["state"] == "unloaded"
    page.keyboard.press("Escape")
    expect(row(page, "coder").locator(".aliases")).to_have_text("default")
    expect(row(page, "chat").locator(".phase")).to_have_text("Unloaded")
