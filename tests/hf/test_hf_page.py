"""The page lets a user choose among the served models: an imported DeiT and DETR on a real photo, then
Swin (whose attention map is refused, the reason shown in its place) and YOLOS."""

from __future__ import annotations

import re
from pathlib import Path

import httpx2
from playwright.sync_api import Browser, expect

from tests.e2e.test_page import browser  # noqa: F401  (the fixture)
from tests.hf.conftest import CLASSIFIERS
from tests.hf.photos import photos


def test_choose_an_imported_model_on_the_page(browser: Browser, hf_server: str, tmp_path: Path) -> None:  # noqa: F811
    photo = tmp_path / "china.jpeg"
    photo.write_bytes(photos()["china.jpeg"])
    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    page.goto(hf_server + "/")
    expect(page.locator("#classifier option")).to_have_count(len(CLASSIFIERS), timeout=20_000)
    assert sorted(page.locator("#detector option").all_inner_texts()) == [
        "hfcondetr (ConditionalDetrForObjectDetection)", "hfdetr (DetrForObjectDetection)",
        "hfyolos (YolosForObjectDetection)",
    ]  # fmt: skip
    page.select_option("#classifier", "hfdeit")
    page.set_input_files("#file", photo)
    top = httpx2.post(f"{hf_server}/v1/classify?model=hfdeit", content=photo.read_bytes(),
                      headers={"content-type": "image/jpeg"}).json()["results"][0][0]["label"]  # fmt: skip
    expect(page.locator("#status")).to_contain_text(f"Top label {top}", timeout=30_000)
    expect(page.locator(".bar").first).to_have_attribute("data-label", top)
    # a photo: scale 1; DeiT's centre crop (32 of 36 pixels) keeps 568 of its 640 columns
    assert page.eval_on_selector("#vit-attention", "img => img.naturalWidth") == 568
    assert page.eval_on_selector("#detr-attention", "img => img.naturalWidth") > 0
    # Swin classifies; in place of its attention map (it has none), the reason
    page.select_option("#classifier", "hfswin")
    page.select_option("#detector", "hfyolos")
    other = tmp_path / "flower.jpeg"  # another file: choosing the same one again fires no change
    other.write_bytes(photos()["flower.jpeg"])
    page.set_input_files("#file", other)
    top = httpx2.post(f"{hf_server}/v1/classify?model=hfswin", content=other.read_bytes(),
                      headers={"content-type": "image/jpeg"}).json()["results"][0][0]["label"]  # fmt: skip
    expect(page.locator("#status")).to_contain_text(f"Top label {top}", timeout=30_000)
    expect(page.locator("#vit-attention-slot")).to_contain_text(re.compile("Not available: .*shifted local windows"))
    assert page.locator("#vit-attention").count() == 0  # no broken frame in its place
    assert page.eval_on_selector("#detr-attention", "img => img.naturalWidth") > 0
    page.close()
