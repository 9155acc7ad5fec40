"""The page lets a user choose among the served models: an imported DeiT and DETR on a real photo, then
Swin (whose attention map is refused, the reason shown in its place) and YOLOS."""

from __future__ import annotations

import base64
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


def test_embeddings_and_zero_shot_panels_on_real_routes(browser: Browser, embed_server: str, tmp_path: Path) -> None:  # noqa: F811
    """The two panels against the real /v1/embed and /v1/zero-shot of an imported CLIP: the page shows
    what the API answers (the stubbed tests in tests/e2e/test_page.py cover the rest)."""
    china, flower = tmp_path / "china.jpeg", tmp_path / "flower.jpeg"
    china.write_bytes(photos()["china.jpeg"])
    flower.write_bytes(photos()["flower.jpeg"])
    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    page.goto(embed_server + "/")
    expect(page.locator("#zero-shot")).to_be_visible(timeout=20_000)
    page.select_option("#zs-model", "hfclip")
    page.fill("#zs-labels", "a pagoda, a flower, a cat")
    page.set_input_files("#zs-file", china)
    expect(page.locator("#zs-bars .bar")).to_have_count(3, timeout=30_000)
    labels = ["a pagoda", "a flower", "a cat"]
    body = {"model": "hfclip", "labels": labels, "images": [base64.b64encode(china.read_bytes()).decode()]}
    answer = httpx2.post(f"{embed_server}/v1/zero-shot", json=body, timeout=30).json()
    shown = [b.get_attribute("data-label") for b in page.locator("#zs-bars .bar").all()]
    assert shown == [r["label"] for r in answer["results"][0]]  # best first, as the API answers
    page.select_option("#embedder", "hfclip")
    page.set_input_files("#embed-file", [china, flower])
    expect(page.locator("#embed-status")).to_contain_text("2 image(s) kept", timeout=30_000)
    assert page.evaluate("() => [...document.images].every((img) => img.complete && img.naturalWidth > 0)")
    page.close()
