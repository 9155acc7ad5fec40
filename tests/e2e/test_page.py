"""The page at / in a real browser (Debian's Chromium, driven by Playwright) against a live server:
upload a digit and see its label, upload a scene and see its boxes, draw a digit and see it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from service.settings import PROJECT_ROOT

CHROMIUM = "/usr/bin/chromium"  # Debian's package (.ci/run installs it); Playwright's own download is not used
EXAMPLES = PROJECT_ROOT / "examples"
SCREENSHOTS = PROJECT_ROOT / "tests" / "e2e" / "screenshots"  # kept out of git; docs/page.png is one of them


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Chromium is missing: apt-get install chromium (as .ci/run does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
        )
        yield browser
        browser.close()


@pytest.fixture()
def page(browser: Browser, server: str) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    page.goto(server + "/")
    yield page
    page.close()


def test_upload_a_digit_and_see_its_label(page: Page) -> None:
    page.set_input_files("#file", EXAMPLES / "digit-7.png")
    expect(page.locator(".bar").first).to_have_attribute("data-label", "7", timeout=20_000)
    expect(page.locator("#status")).to_contain_text("Top label 7", timeout=20_000)
    assert page.eval_on_selector("#vit-attention", "img => img.naturalWidth") == 512  # 128 px x scale 4


def test_upload_a_scene_and_see_its_boxes(page: Page) -> None:
    page.set_input_files("#file", EXAMPLES / "scene.png")
    expect(page.locator("li.detection")).to_have_count(4, timeout=20_000)
    expect(page.locator("#status")).to_contain_text("4 detection(s)", timeout=20_000)
    assert page.eval_on_selector("#boxes", "img => img.naturalWidth") > 0
    assert page.eval_on_selector("#detr-attention", "img => img.naturalWidth") > 0
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "page.png"), full_page=True)


def test_draw_a_digit_row_by_row(page: Page) -> None:
    page.select_option("#digit", "3")
    page.click("#generate")
    expect(page.locator("#canvas")).to_have_attribute("data-done", "true", timeout=20_000)
    expect(page.locator("#gen-status")).to_contain_text("Done: a 3")
    lit = page.evaluate(
        """() => { const c = document.getElementById('canvas');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] > 40; return n; }"""
    )
    assert lit > 1000  # ink was drawn (the canvas started black)


def test_fits_a_phone(browser: Browser, server: str) -> None:
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(server + "/")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    assert phone.locator("#drop").is_visible() and phone.locator("#generate").is_visible()
    phone.close()
