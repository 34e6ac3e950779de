"""The admin console in a real headless Chromium against a live `loramux serve`.

Chromium is the Debian package (`apt-get install -y chromium`), driven by playwright's
Python client; `playwright install` is never used. Screenshots go to
$CONSOLE_SCREENSHOTS_DIR when set, else to a temp dir; the README's come from
`CONSOLE_SCREENSHOTS_DIR=docs/screenshots pytest tests/e2e/test_console_browser.py`.

The page tests run on real data made through the API: uploaded adapters (one version
rejected by validation), finished requests, a finished batch and a long one to cancel.
Each page is checked at 1280 px and 420 px wide: no card is wider than its content box.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ADMIN_KEY, LiveServer
from tests.engine.peft_reference import load_base, save_random_adapter
from tests.platform.adapters.helpers import upload, wait_validated
from tests.platform.adapters.hostile_values import hostile_adapters

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # reported by the `browser` fixture
    sync_playwright = None

FINAL = ("completed", "failed", "expired", "cancelled")
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
    folder = Path(os.environ.get("CONSOLE_SCREENSHOTS_DIR") or tmp_path)
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


def test_operator_manages_a_tenant_and_its_keys(page: Page, live_server: LiveServer) -> None:
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
    page.get_by_role("checkbox", name="batches").uncheck()
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

    # the audit log has every step
    page.get_by_role("link", name="Audit log", exact=True).click()
    audit = page.locator("#audit-body")
    for action in ("tenant.create", "tenant.update", "key.create", "key.revoke"):
        expect(audit).to_contain_text(action)
    expect(audit).to_contain_text('status: "suspended"')
    expect(audit).to_contain_text("requests_per_minute: 120, max_storage_bytes: 1073741824")
    expect(audit.locator("tr").first).to_contain_text("console-acme")

    # signing out forgets the key
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('loramux.adminKey')") is None


def test_engine_status_refreshes(page: Page, live_server: LiveServer) -> None:
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
    expect(page.locator("#engine-updated")).to_have_text(
        re.compile(r"^Updated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\.$")
    )


# --- pages on real data -----------------------------------------------------------------------

WIDTHS = (1280, 420)
PRICES = {
    "models": {"*": {"input_per_million_tokens": "0.5", "output_per_million_tokens": "1.5"}},
    "storage_per_gb_month": "0.1",
    "batch_discount_percent": "50",
}


@dataclass
class Populated:
    server: LiveServer
    acme: dict[str, Any]
    acme_key: str
    globex: dict[str, Any]
    base_model: str
    finished_batch: str


def bearer_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def complete(server: LiveServer, key: str, model: str, prompt: str, max_tokens: int = 8) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        headers=bearer_headers(key),
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text


def create_batch(server: LiveServer, key: str, model: str, lines: int, max_tokens: int) -> str:
    body = "".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Question {i}"}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
            }
        )
        + "\n"
        for i in range(lines)
    )
    with httpx.Client(base_url=server.base_url, headers=bearer_headers(key), timeout=60) as http:
        uploaded = http.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("lines.jsonl", body.encode())},
        )
        assert uploaded.status_code == 200, uploaded.text
        batch = http.post(
            "/v1/batches",
            json={
                "input_file_id": uploaded.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        assert batch.status_code == 200, batch.text
        return str(batch.json()["id"])


def wait_batch(server: LiveServer, key: str, batch_id: str, statuses: tuple[str, ...]) -> Any:
    deadline = time.monotonic() + 180
    while True:
        batch = httpx.get(
            f"{server.base_url}/v1/batches/{batch_id}", headers=bearer_headers(key), timeout=30
        ).json()
        if batch["status"] in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch stuck: {batch}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def populated(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Populated:
    """Two tenants with real adapters, requests and a finished batch, and a price table."""
    tmp = tmp_path_factory.mktemp("console-data")
    with live_server.admin() as admin:
        assert admin.put("/admin/api/prices", json=PRICES).status_code == 200
        base_model = admin.get("/admin/api/engine").json()["base_model_id"]
    acme, acme_key = live_server.make_tenant(
        "acme-support", max_adapters=5, max_storage_bytes=1 << 30, monthly_token_quota=2_000_000
    )
    globex, globex_key = live_server.make_tenant("globex-legal", requests_per_minute=600)
    base = load_base(Path(live_server.env["LORAMUX_MODEL"]))
    adapters = {
        (acme_key, "support-bot"): {"r": 8, "target_modules": "all-linear"},
        (acme_key, "triage"): {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        (globex_key, "contracts"): {"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    }
    with httpx.Client(base_url=live_server.base_url, timeout=60) as http:
        for seed, ((key, name), lora) in enumerate(adapters.items()):
            adapter_dir, base = save_random_adapter(
                base, tmp / name, seed=seed, std=0.3, lora_alpha=16, **lora
            )
            assert upload(http, key, name, adapter_dir).status_code == 201
            assert wait_validated(http, key, name)["status"] == "ready"
        # a second version of support-bot that validation rejects, with its reason
        hostile = hostile_adapters(tmp / "support-bot")["alpha-1e300"]
        response = upload(http, acme_key, "support-bot", config=hostile.config,
                          weights=hostile.weights)  # fmt: skip
        assert response.status_code == 201, response.text
        assert wait_validated(http, acme_key, "support-bot")["status"] == "rejected"
    for i in range(3):
        complete(live_server, acme_key, "support-bot@1", f"Where is my order {i}?")
    complete(live_server, acme_key, "triage", "Route this ticket", max_tokens=16)
    complete(live_server, acme_key, base_model, "Hello")
    complete(live_server, globex_key, "contracts", "Clause 4.2 says", max_tokens=24)
    finished = create_batch(live_server, acme_key, "support-bot@1", lines=6, max_tokens=8)
    assert wait_batch(live_server, acme_key, finished, FINAL)["status"] == "completed"
    return Populated(live_server, acme, acme_key, globex, base_model, finished)


def fits(page: Page) -> list[str]:
    """Cards (sections, stat cards) wider than their box, and the page wider than the window."""
    return list(
        page.evaluate(
            """() => {
              const wide = [...document.querySelectorAll('main section:not([hidden]), .card')]
                .filter((e) => e.offsetParent !== null && e.scrollWidth > e.clientWidth)
                .map((e) => `${e.id || e.className}: ${e.scrollWidth} > ${e.clientWidth}`);
              const doc = document.documentElement;
              if (doc.scrollWidth > window.innerWidth) {
                wide.push(`page: ${doc.scrollWidth} > ${window.innerWidth}`);
              }
              return wide;
            }"""
        )
    )


def check_widths(page: Page, name: str, tmp_path: Path) -> None:
    """At each width: nothing overflows its card; a screenshot of each."""
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_function("() => document.fonts.status === 'loaded'")
        assert fits(page) == [], (name, width)
        screenshot(page, name if width == 1280 else f"{name}-{width}", tmp_path)
    page.set_viewport_size({"width": 1280, "height": 900})


def no_local_times(page: Page) -> None:
    text = page.locator("main").inner_text()
    assert not re.search(r"\b\d{1,2}:\d\d(:\d\d)?\s?[AP]M\b", text), "a 12-hour local time"
    for shown in page.locator("main time").all_inner_texts():
        assert shown.endswith(" UTC"), shown


def test_tenants_list_shows_usage_beside_quotas(
    page: Page, populated: Populated, tmp_path: Path
) -> None:
    page.goto("/admin/")
    sign_in(page, ADMIN_KEY)
    row_ = page.locator("#tenants-body tr").filter(has_text="acme-support")
    listed = admin_get(populated.server, "/admin/api/tenants")["data"]
    acme = next(t for t in listed if t["id"] == populated.acme["id"])
    assert acme["usage"]["adapters_used"] == 2
    tokens = acme["usage"]["this_month"]["total_tokens"]
    assert tokens > 0 and acme["usage"]["this_month"]["cost_micro_usd"] > 0
    expect(row_).to_contain_text("2 / 5")  # adapters used / max
    expect(row_).to_contain_text(" / 1.0 GiB")  # storage used / max
    expect(row_).to_contain_text(" / 2M")  # tokens this month / monthly quota
    expect(row_).to_contain_text("$")
    globex = page.locator("#tenants-body tr").filter(has_text="globex-legal")
    expect(globex).to_contain_text("1 / unlimited")
    expect(globex).to_contain_text("600 req/min")
    no_local_times(page)
    check_widths(page, "console-tenants", tmp_path)


def test_tenant_page_shows_adapters_usage_batches_and_a_statement(
    page: Page, populated: Populated, tmp_path: Path
) -> None:
    acme_id = populated.acme["id"]
    page.goto(f"/admin/#tenant/{acme_id}")
    sign_in(page, ADMIN_KEY)
    expect(page.locator("#tenant-title")).to_have_text("acme-support")
    expect(page.locator("#summary-adapters")).to_have_text("2 / 5")

    # adapters and every version: status, reason, size, rank, targets, created, last used
    versions = page.locator('#adapters-body tr[data-adapter="support-bot"]')
    expect(versions).to_have_count(2)
    expect(versions.nth(0)).to_contain_text("v2")
    expect(versions.nth(0)).to_contain_text("rejected")
    expect(versions.nth(0)).to_contain_text("LoRA scale")
    expect(versions.nth(0)).to_contain_text("never")  # a rejected version is never used
    expect(versions.nth(1)).to_contain_text("ready")
    expect(versions.nth(1)).to_contain_text("KiB")
    expect(versions.nth(1)).to_contain_text("8 (alpha 16)")
    expect(versions.nth(1)).to_contain_text("q_proj")
    expect(versions.nth(1).locator("time")).to_have_count(2)  # created and last used
    triage = page.locator('#adapters-body tr[data-adapter="triage"]')
    expect(triage).to_contain_text("q_proj, v_proj in 4 layers")
    expect(page.locator("#adapters-body")).not_to_contain_text("contracts")  # globex's

    # usage: a bar per day, in and out, per adapter; a table with the cost
    chart = page.locator("#usage-chart svg")
    expect(chart).to_have_attribute("role", "img")
    assert chart.locator("rect.bar").count() >= 3 * 2  # base, support-bot and triage, in + out
    expect(page.locator("#usage-chart .legend")).to_contain_text("support-bot v1")
    usage_row = page.locator("#usage-body tr").filter(has_text="support-bot v1")
    expect(usage_row).to_contain_text("9")  # 3 requests + 6 batch lines
    expect(usage_row).to_contain_text("$")

    # the batch that ran: completed, 6 / 6
    batch_row = page.locator(f'#tenant-batches-body tr[data-batch-id="{populated.finished_batch}"]')
    expect(batch_row).to_contain_text("completed")
    expect(batch_row).to_contain_text("6 / 6")
    expect(page.locator("#keys-body tr")).to_have_count(1)
    no_local_times(page)
    check_widths(page, "console-tenant", tmp_path)

    # the statement downloaded is the one the admin API serves, total included
    month = time.strftime("%Y-%m", time.gmtime())
    with page.expect_download() as download:
        page.get_by_role("button", name="Download statement (CSV)").click()
    assert download.value.suggested_filename == f"statement-acme-support-{month}.csv"
    text = Path(download.value.path()).read_text()
    with populated.server.admin() as admin:
        served = admin.get(f"/admin/api/tenants/{acme_id}/statement?month={month}").text
    assert text == served
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["kind"] for r in rows} == {"interactive", "batch", "storage", "total"}
    assert Decimal(rows[-1]["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in rows[:-1]) > 0

    # delete an adapter from its row, after a confirmation
    page.get_by_role("button", name="Delete adapter triage").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete adapter").click()
    expect(page.locator('#adapters-body tr[data-adapter="triage"]')).to_have_count(0)
    gone = httpx.get(
        f"{populated.server.base_url}/v1/adapters/triage",
        headers=bearer_headers(populated.acme_key),
    )
    assert gone.status_code == 404


def test_forms_clear_when_another_tenant_opens(page: Page, populated: Populated) -> None:
    page.goto(f"/admin/#tenant/{populated.acme['id']}")
    sign_in(page, ADMIN_KEY)
    expect(page.locator("#tenant-title")).to_have_text("acme-support")
    page.get_by_label("Key name").fill("half-typed")
    page.get_by_role("checkbox", name="batches").uncheck()
    page.get_by_label("Requests / min").fill("77")
    page.get_by_label("Statement month").fill("2026-01")
    page.get_by_label("Period").select_option("90")
    page.goto(f"/admin/#tenant/{populated.globex['id']}")
    expect(page.locator("#tenant-title")).to_have_text("globex-legal")
    expect(page.get_by_label("Key name")).to_have_value("default")
    expect(page.get_by_role("checkbox", name="batches")).to_be_checked()
    expect(page.get_by_label("Requests / min")).to_have_value("600")  # globex's own quota
    expect(page.get_by_label("Statement month")).to_have_value(
        time.strftime("%Y-%m", time.gmtime())
    )
    expect(page.get_by_label("Period")).to_have_value("month")
    expect(page.locator("#adapters-body")).to_contain_text("contracts")
    expect(page.locator("#adapters-body")).not_to_contain_text("support-bot")


def test_engine_and_batches_pages_under_a_running_batch(
    page: Page, populated: Populated, tmp_path: Path
) -> None:
    server = populated.server
    running = create_batch(server, populated.acme_key, "support-bot@1", lines=3000, max_tokens=64)
    try:
        wait_batch(server, populated.acme_key, running, ("in_progress",))
        page.goto("/admin/#engine")
        sign_in(page, ADMIN_KEY)
        # requests per tenant, by name; the adapter in its slot, with its tenant
        expect(page.locator("#engine-tenants-body")).to_contain_text("acme-support")
        slots = page.locator("#resident-body")
        expect(slots).to_contain_text("support-bot v1")
        expect(slots.locator("tr").filter(has_text="support-bot v1")).to_contain_text(
            "acme-support"
        )
        expect(page.locator("#stat-kv_cache_bytes")).to_have_text(
            re.compile(r" of [\d.]+ (KiB|MiB|GiB)$")
        )
        tiers = page.locator("#tiers-body")
        expect(tiers).to_contain_text("Device slots")
        expect(tiers.locator("tr").filter(has_text="Host memory")).to_contain_text(
            re.compile(r"iB of ")
        )
        # the last minutes: throughput and latency drawn from the finished requests
        expect(page.locator("#throughput-chart svg circle")).to_have_count(15)
        assert page.locator("#latency-chart svg circle").count() >= 2
        expect(page.locator("#engine-updated")).to_contain_text("UTC")
        no_local_times(page)
        check_widths(page, "console-engine", tmp_path)

        page.get_by_role("link", name="Batches", exact=True).click()
        expect(page.get_by_role("heading", name="Batches")).to_be_visible()
        table = page.locator("#batches-body")
        expect(table.locator(f'tr[data-batch-id="{populated.finished_batch}"]')).to_contain_text(
            "completed"
        )
        expect(table.locator(f'tr[data-batch-id="{running}"]')).to_contain_text("in_progress")
        check_widths(page, "console-batches", tmp_path)
        page.get_by_label("Status").select_option("in_progress")
        live = table.locator(f'tr[data-batch-id="{running}"]')
        expect(live).to_contain_text("acme-support")
        expect(table.locator("tr")).to_have_count(1)
        live.get_by_role("button", name=f"Cancel batch {running}").click()
        page.get_by_role("dialog").get_by_role("button", name="Cancel batch").click()
        expect(table).to_contain_text("No batches match.")  # it left in_progress
        done = wait_batch(server, populated.acme_key, running, ("cancelled",))
        assert done["request_counts"]["completed"] < 3000
    finally:  # a failure above must not leave 3,000 lines running for the next tests
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            http.post(f"/v1/batches/{running}/cancel", headers=bearer_headers(populated.acme_key))


def test_prices_page_edits_the_table(page: Page, populated: Populated, tmp_path: Path) -> None:
    page.goto("/admin/#prices")
    sign_in(page, ADMIN_KEY)
    expect(page.get_by_label("Base model 1", exact=True)).to_have_value("*")
    expect(page.get_by_label("Input price 1", exact=True)).to_have_value("0.5")
    expect(page.get_by_label("Batch discount (%)")).to_have_value("50")
    expect(page.locator("#prices-effective")).to_contain_text(" UTC, set by admin")
    page.get_by_role("button", name="Add a base model").click()
    page.get_by_label("Base model 2", exact=True).fill(populated.base_model)
    page.get_by_label("Input price 2", exact=True).fill("0.25")
    page.get_by_label("Output price 2", exact=True).fill("0.75")
    page.get_by_label("Storage, per GB-month").fill("0.123456789")
    page.get_by_role("button", name="Save prices").click()
    expect(page.locator("#prices-error")).to_contain_text("storage_per_gb_month")
    page.get_by_label("Storage, per GB-month").fill("0.2")
    page.get_by_role("button", name="Save prices").click()
    expect(page.get_by_role("status").filter(has_text="Prices saved.")).to_be_visible()
    table = admin_get(populated.server, "/admin/api/prices")
    assert table["models"][populated.base_model] == {
        "input_per_million_tokens": "0.250000",
        "output_per_million_tokens": "0.750000",
    }
    assert table["storage_per_gb_month"] == "0.200000"
    check_widths(page, "console-prices", tmp_path)
    with populated.server.admin() as admin:  # back to the table the other tests expect
        assert admin.put("/admin/api/prices", json=PRICES).status_code == 200


def test_audit_log_fits_and_shows_utc(page: Page, populated: Populated, tmp_path: Path) -> None:
    page.goto("/admin/#audit")
    sign_in(page, ADMIN_KEY)
    audit = page.locator("#audit-body")
    expect(audit).to_contain_text("prices.update")
    expect(audit).to_contain_text("adapter.upload")
    no_local_times(page)
    check_widths(page, "console-audit", tmp_path)
