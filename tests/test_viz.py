"""Pictures: PNGs decode at the size asked for and are not blank; the attention page works in a
real (headless Chromium) browser, offline, and shows the prompt's tokens."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lucidlm.viz.attention_page import attention_page
from lucidlm.viz.embedding_map import MAP_FIGSIZE, embedding_map
from lucidlm.viz.heatmaps import (DPI, attention_grid, attention_heatmap, grid_figsize, heatmap_figsize, lens_figsize,
                                  lens_heatmap)

TOKENS = ["The", " capital", " of", " France", " is", "</script>", "日本"]
LABELS = [t.replace(" ", "␣") for t in TOKENS]
T = len(TOKENS)


def causal_patterns(*lead: int) -> torch.Tensor:
    scores = torch.randn(*lead, T, T, generator=torch.Generator().manual_seed(0))
    return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


def assert_picture(path, figsize: tuple[float, float]) -> None:
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    assert image.size == (round(figsize[0] * DPI), round(figsize[1] * DPI))
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert pixels.std() > 20  # not a blank or single-colour image
    assert len(np.unique(pixels, axis=0)) > 50  # many colours: drawn, not flat


def test_attention_heatmap(tmp_path):
    path = attention_heatmap(causal_patterns(), LABELS, "one head", tmp_path / "a.png")
    assert_picture(path, heatmap_figsize(T, T))


def test_attention_grid(tmp_path):
    path = attention_grid(causal_patterns(9), LABELS, "nine heads", tmp_path / "sub" / "grid.png")
    assert_picture(path, grid_figsize(9, T))


def test_lens_heatmap(tmp_path):
    L = 6
    probs = torch.rand(L, T, generator=torch.Generator().manual_seed(1))
    labels = [[f"tok{layer}{p}" for p in range(T)] for layer in range(L)]
    path = lens_heatmap(probs, labels, LABELS, "lens", tmp_path / "lens.png")
    assert_picture(path, lens_figsize(L, T))


def test_embedding_map(tmp_path):
    coords = torch.tensor([[math.cos(a), math.sin(a)] for a in torch.linspace(0, 3, 8).tolist()])
    path = embedding_map(coords, [f"word{i}" for i in range(8)], "map", ("x", "y"), tmp_path / "map.png")
    assert_picture(path, MAP_FIGSIZE)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    patterns = causal_patterns(2, 3)  # (L, H, T, T)
    return attention_page(patterns, TOKENS, "Attention: <test & prompt>", tmp_path_factory.mktemp("page") / "a.html",
                          layer=1, head=2), patterns


def test_page_is_self_contained(page):
    path, patterns = page
    html = path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # no CDN, no network
    assert html.count("</script>") == 2  # the token "</script>" did not close the data element
    assert "<title>Attention: &lt;test &amp; prompt&gt;</title>" in html
    data = json.loads(re.search(r'id="attention-data">(.*?)</script>', html, re.S).group(1))
    assert data["tokens"] == TOKENS and (data["n_layers"], data["n_heads"]) == (2, 3)
    row = data["patterns"][1][2][4]  # layer 1, head 2, query 4: keys 0..4 only
    assert row == pytest.approx(patterns[1, 2, 4, :5].tolist(), abs=1e-4)


def _chromium():
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_in_headless_chromium(page):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    path, patterns = page
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            tab.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:")
                      else route.continue_())  # prove it needs no network
            errors = []
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(path.as_uri())
            spans = tab.locator("#tokens .token")
            assert spans.all_text_contents() == LABELS
            assert tab.locator("#layer").input_value() == "1" and tab.locator("#head").input_value() == "2"
            spans.nth(4).hover()  # " is" attends to tokens 0..4
            backgrounds = [spans.nth(k).evaluate("e => getComputedStyle(e).backgroundColor") for k in range(T)]
            alpha = [float(re.findall(r"[\d.]+", b)[3]) if b.startswith("rgba") else 1.0 for b in backgrounds]
            # The browser stores alpha in 8 bits: equal to the weight within 1/255.
            assert alpha[:5] == pytest.approx(patterns[1, 2, 4, :5].tolist(), abs=1 / 255 + 1e-4)
            assert all(b == "rgba(0, 0, 0, 0)" for b in backgrounds[5:])  # the future is not attended
            assert "␣is attends to:" in tab.locator("#readout").text_content()
            tab.select_option("#head", "mean")
            assert tab.locator("#matrix tr").count() == T + 1
            assert errors == []
        finally:
            browser.close()
