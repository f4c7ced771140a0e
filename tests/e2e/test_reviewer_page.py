"""The reviewer page in headless Chromium (Debian's, driven by Playwright): approve and reject real orders.

The API is served by uvicorn on a free port, over the real broker, with the whole saga running.
No browser is downloaded: Playwright drives /usr/bin/chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from schemas.envelope import Envelope
from services.approval.server import ReviewerApi
from services.common.publisher import publish
from services.common.settings import ChoreoSettings
from tests.e2e.harness import TEST_TOKEN, SagaStack, timeline, wait_for_events
from tests.e2e.test_approval_http import approval_settings, big_order

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@contextlib.asynccontextmanager
async def served(api: ReviewerApi) -> AsyncIterator[str]:
    """The API on a free loopback port; its base URL."""
    serving = asyncio.create_task(api.serve("127.0.0.1", 0))
    try:
        await asyncio.wait_for(api.listening.wait(), 30)
        yield f"http://127.0.0.1:{api.port}"
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


def row(page: Page, order_id: str) -> str:
    return f'#approvals tr[data-order-id="{order_id}"]'


@pytest.fixture
async def stack(choreo_settings: ChoreoSettings) -> AsyncIterator[SagaStack]:
    async with SagaStack(choreo_settings, {"approval": {"approval_timeout": 3600}}) as running:
        await running.start()
        yield running


async def test_a_reviewer_approves_and_rejects_through_the_page(
    stack: SagaStack, choreo_settings: ChoreoSettings, tmp_path: Path
) -> None:
    api = ReviewerApi(approval_settings(choreo_settings))
    await api.start()
    orders: list[Envelope] = [big_order("o-page-approve"), big_order("o-page-reject")]
    await publish(choreo_settings, orders)
    for placed in orders:
        await wait_for_events(choreo_settings, placed.order_id, "ApprovalRequested")
    try:
        async with served(api) as base_url, chromium() as browser:
            page = await browser.new_page()
            await page.goto(base_url + "/")

            # The token is asked for once; a wrong one is refused and asked for again.
            await expect(page.locator("#sign-in")).to_be_visible()
            await page.fill("#token", "not-the-token")
            await page.click("#token-form button[type=submit]")
            await expect(page.locator("#token")).to_have_attribute("placeholder", "token refused, enter it again")
            await expect(page.locator("#sign-in")).to_be_visible()
            await page.fill("#token", TEST_TOKEN)
            await page.click("#token-form button[type=submit]")
            await expect(page.locator("#reviews")).to_be_visible()
            await page.fill("#reviewer", "alice")
            await page.locator("#reviewer").dispatch_event("change")

            approve = page.locator(row(page, "o-page-approve"))
            await expect(approve).to_be_visible(timeout=15_000)
            await expect(approve).to_contain_text("cust-o-page-approve")
            await expect(approve).to_contain_text("1200.00 EUR")
            await expect(approve).to_contain_text("10 \u00d7 WIDGET-1 @ 120.00")
            await page.screenshot(path=str(tmp_path / "reviewer-page.png"), full_page=True)

            await approve.locator("input.comment").fill("verified by phone")
            await approve.locator("button.approve").click()
            await expect(page.locator("#message")).to_contain_text("Approval of o-page-approve submitted")
            await page.locator(row(page, "o-page-reject")).locator("button.reject").click()
            await expect(page.locator("#message")).to_contain_text("Rejection of o-page-reject submitted")

            approved = await wait_for_events(choreo_settings, "o-page-approve", "OrderCompleted")
            rejected = await wait_for_events(choreo_settings, "o-page-reject", "OrderCancelled")
            # Decided orders leave the list at the next refresh.
            await expect(page.locator(row(page, "o-page-approve"))).to_have_count(0, timeout=15_000)
            await expect(page.locator(row(page, "o-page-reject"))).to_have_count(0, timeout=15_000)
            await expect(page.locator("#empty")).to_be_visible()

            # The token lives in this tab's session storage: a reload needs no second sign-in.
            await page.reload()
            await expect(page.locator("#reviews")).to_be_visible()
            assert await page.evaluate("sessionStorage.getItem('choreo.approval.token')") == TEST_TOKEN
    finally:
        await api.stop()

    assert "ApprovalGranted" in approved
    assert "ApprovalDenied" in rejected
    assert "ApprovalDecisionIgnored" not in await timeline(choreo_settings, "o-page-approve")
