"""The admin console in a real headless Chromium against a live `loramux serve`.

Chromium is the Debian package (`apt-get install -y chromium`), driven by playwright's
Python client; `playwright install` is never used. Screenshots go to
$LORAMUX_CONSOLE_SCREENSHOTS when set (for a look by eye), else to a temp dir.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ADMIN_KEY, LiveServer

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # reported by the `browser` fixture
    sync_playwright = None

CHROMIUM = os.environ.get("LORAMUX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = None
    if sync_playwright is None:
        missing = "the playwright package is not installed (pip install -e '.[dev]')"
    elif not Path(CHROMIUM).is_file():
        missing = f"Chromium not found at {CHROMIUM} (apt-get install -y chromium chromium-driver)"
    if missing:
        if os.environ.get("LORAMUX_REQUIRE_SERVICES") == "1":
            pytest.fail(f"browser test needs Chromium: {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, live_server: LiveServer) -> Iterator[Page]:
    context = browser.new_context(
        base_url=live_server.base_url, viewport={"width": 1280, "height": 900}
    )
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server.base_url)
    context.set_default_timeout(30_000)
    expect.set_options(timeout=30_000)
    new_page = context.new_page()
    problems: list[str] = []
    # CSP violations and script errors surface here; failed API calls we cause on purpose
    # are logged by Chromium as "Failed to load resource", which is expected.
    new_page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    new_page.on(
        "console",
        lambda message: (
            problems.append(f"console: {message.text}")
            if message.type == "error" and not message.text.startswith("Failed to load resource")
            else None
        ),
    )
    yield new_page
    assert context.cookies() == []
    context.close()
    assert problems == []


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("LORAMUX_CONSOLE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def admin_get(server: LiveServer, path: str) -> Any:
    with server.admin() as admin:
        response = admin.get(path)
        response.raise_for_status()
        return response.json()


def sign_in(page: Page, key: str) -> None:
    page.get_by_label("Admin key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def test_operator_manages_a_tenant_and_its_keys(
    page: Page, live_server: LiveServer, tmp_path: Path
) -> None:
    page.goto("/admin/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    sign_in(page, "lmx_not-the-admin-key-0000000000000000")
    expect(page.locator("#login-error")).to_have_text("Incorrect API key provided.")
    sign_in(page, ADMIN_KEY)
    expect(page.get_by_role("heading", name="Tenants")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('loramux.adminKey')") == ADMIN_KEY
    assert ADMIN_KEY not in page.url

    # create a tenant: the console opens its page
    page.get_by_label("New tenant name").fill("console-acme")
    page.get_by_role("button", name="Create tenant").click()
    expect(page.locator("#tenant-title")).to_have_text("console-acme")
    expect(page.locator("#tenant-status")).to_have_text("active")
    tenant_id = page.url.rsplit("/", 1)[1]

    # quotas: a value, and an empty field meaning unlimited
    page.get_by_label("Requests / min").fill("120")
    page.get_by_label("Storage (bytes)").fill("1073741824")
    page.get_by_role("button", name="Save quotas").click()
    expect(page.get_by_role("status").filter(has_text="Quotas saved.")).to_be_visible()
    tenant = admin_get(live_server, f"/admin/api/tenants/{tenant_id}")
    assert tenant["requests_per_minute"] == 120
    assert tenant["max_storage_bytes"] == 1073741824
    assert tenant["tokens_per_minute"] is None

    # a key with chosen scopes: the secret is shown once, and it works
    page.get_by_label("Key name").fill("ci")
    page.get_by_label("batches").uncheck()
    page.get_by_role("button", name="Create key").click()
    panel = page.get_by_role("region", name="New API key")
    expect(panel).to_contain_text("You will not see it again.")
    secret = page.get_by_label("Secret API key").input_value()
    assert secret.startswith("lmx_")
    models = httpx.get(
        f"{live_server.base_url}/v1/models", headers={"Authorization": f"Bearer {secret}"}
    )
    assert models.status_code == 200
    page.get_by_role("button", name="Copy").click()
    expect(panel).to_contain_text("Copied to the clipboard.")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    key_row = page.locator("#keys-body tr").filter(has_text="ci")
    expect(key_row).to_contain_text(secret[:12])
    expect(key_row).to_contain_text("adapters:read, adapters:write, inference")
    expect(key_row).to_contain_text("active")
    screenshot(page, "tenant", tmp_path)
    page.get_by_role("button", name="I have copied it").click()
    expect(panel).to_be_hidden()
    assert secret not in page.content()
    page.reload()
    expect(page.locator("#tenant-title")).to_have_text("console-acme")
    assert secret not in page.content()

    # revoke, after a confirmation; the key stops working at once
    page.get_by_role("button", name=re.compile(r"Revoke key ci")).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("cannot be undone")
    dialog.get_by_role("button", name="Revoke key").click()
    expect(key_row).to_contain_text("revoked")
    models = httpx.get(
        f"{live_server.base_url}/v1/models", headers={"Authorization": f"Bearer {secret}"}
    )
    assert models.status_code == 401

    # suspend, after a confirmation; cancel first changes nothing
    page.get_by_role("button", name="Suspend tenant").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    expect(page.locator("#tenant-status")).to_have_text("active")
    page.get_by_role("button", name="Suspend tenant").click()
    page.get_by_role("dialog").get_by_role("button", name="Suspend").click()
    expect(page.locator("#tenant-status")).to_have_text("suspended")
    expect(page.get_by_role("button", name="Reactivate tenant")).to_be_visible()
    assert admin_get(live_server, f"/admin/api/tenants/{tenant_id}")["status"] == "suspended"

    # the list shows it; an API error is shown inline, readable
    page.get_by_role("link", name="Tenants", exact=True).click()
    tenant_row = page.locator("#tenants-body tr").filter(has_text="console-acme")
    expect(tenant_row).to_contain_text("suspended")
    expect(tenant_row).to_contain_text("1.0 GiB")
    page.get_by_label("New tenant name").fill("console-acme")
    page.get_by_role("button", name="Create tenant").click()
    expect(page.locator("#tenants-error")).to_have_text(
        "a tenant named 'console-acme' already exists (field: name)"
    )
    screenshot(page, "tenants", tmp_path)

    # the audit log has every step
    page.get_by_role("link", name="Audit log", exact=True).click()
    audit = page.locator("#audit-body")
    for action in ("tenant.create", "tenant.update", "key.create", "key.revoke"):
        expect(audit).to_contain_text(action)
    expect(audit).to_contain_text('status: "suspended"')
    expect(audit).to_contain_text("requests_per_minute: 120, max_storage_bytes: 1073741824")
    expect(audit.locator("tr").first).to_contain_text("console-acme")
    screenshot(page, "audit", tmp_path)

    # signing out forgets the key
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('loramux.adminKey')") is None


def test_engine_status_refreshes(page: Page, live_server: LiveServer, tmp_path: Path) -> None:
    page.goto("/admin/#engine")
    sign_in(page, ADMIN_KEY)
    expect(page.get_by_role("heading", name="Engine")).to_be_visible()
    model = admin_get(live_server, "/admin/api/engine")["base_model_id"]
    expect(page.locator("#engine-stats")).to_contain_text(model)
    finished = page.locator("#stat-num_finished_total")
    before = int(finished.inner_text().replace(",", ""))

    _, key = live_server.make_tenant("console-traffic")
    completion = httpx.post(
        f"{live_server.base_url}/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert completion.status_code == 200, completion.text
    # no reload: the page polls on its own
    expect(finished).not_to_have_text(str(before))
    expect(page.locator("#stat-num_running")).to_have_text(re.compile(r"^\d+$"))
    expect(page.locator("#stat-kv_cache_usage")).to_have_text(re.compile(r"^[\d.]+ %$"))
    expect(page.locator("#engine-updated")).to_contain_text("Updated")
    screenshot(page, "engine", tmp_path)
