"""The explorer page of `lucid serve` and its endpoints, on the real SmolLM2.

The endpoints are checked through the app against the library (whose hook-point patterns are
tested against transformers' output_attentions, and whose logits against transformers'); the
page is driven in headless Chromium against a running server, with the network cut off."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from lucidlm.server.app import create_app
from lucidlm.server.explorer import MAX_TOKENS, STATIC

pytestmark = pytest.mark.slow  # loads the real model

TEXT = "The cat sat on the mat because it was tired."
OUT = Path(__file__).resolve().parents[1] / "lucid-out"


@pytest.fixture(scope="module")
def client(lucid_smollm):
    with TestClient(create_app(lucid_smollm)) as client:  # leaving the block stops the app's engine
        yield client


def test_info(client, lucid_smollm):
    info = client.get("/explore/info").json()
    cfg = lucid_smollm.config
    assert (info["n_layers"], info["n_heads"]) == (cfg.n_layers, cfg.n_heads)
    assert info["model"] in client.get("/v1/models").text  # the name the OpenAI endpoints answer to
    assert info["max_tokens"] == MAX_TOKENS


def test_attention_is_the_models_pattern(client, lucid_smollm):
    m = lucid_smollm
    _, cache = m.run_with_cache(TEXT, names="blocks.3.attn.hook_pattern")
    expected = cache["blocks.3.attn.hook_pattern"][0]  # (H, T, T)
    ids = m.tokenizer.encode(TEXT)

    answer = client.post("/explore/attention", json={"text": TEXT, "layer": 3, "head": 2}).json()
    assert answer["ids"] == ids and (answer["layer"], answer["head"]) == (3, 2)
    assert answer["tokens"] == [m.tokenizer.decode([i]) for i in ids]
    assert torch.tensor(answer["pattern"]) == pytest.approx(expected[2], abs=1e-5)  # rounded to 5 decimals

    mean = client.post("/explore/attention", json={"ids": ids, "layer": 3, "head": "mean"}).json()
    assert torch.tensor(mean["pattern"]) == pytest.approx(expected.mean(0), abs=1e-5)


def test_lens_after_the_last_layer_is_the_models_prediction(client, lucid_smollm):
    m = lucid_smollm
    logits = m.logits(m.tokenizer.encode(TEXT))  # (T, V)
    lens = client.post("/explore/lens", json={"text": TEXT, "k": 3}).json()
    L, T = m.config.n_layers, logits.shape[0]
    assert lens["positions"] == list(range(T))
    assert torch.tensor(lens["top_ids"]).shape == (L, T, 3)
    assert [cell[0] for cell in lens["top_ids"][-1]] == logits.argmax(-1).tolist()
    assert [cell[0] for cell in lens["top_probs"][-1]] == pytest.approx(logits.softmax(-1).amax(-1).tolist(), abs=1e-5)
    assert lens["top_tokens"][-1][-1][0] == m.tokenizer.decode([int(logits[-1].argmax())])
    # the probabilities of each cell are the k most likely, in order
    assert all(cell == sorted(cell, reverse=True) for row in lens["top_probs"] for cell in row)

    last = client.post("/explore/lens", json={"text": TEXT, "k": 2, "last_only": True}).json()
    assert last["positions"] == [T - 1]
    assert [row[0] for row in last["top_ids"]] == [row[-1][:2] for row in lens["top_ids"]]


def test_a_chat_is_read_as_the_model_saw_it(client, lucid_smollm):
    m = lucid_smollm
    question = [{"role": "user", "content": "What is the capital of France?"}]
    chat = question + [{"role": "assistant", "content": "The capital of France is Paris."}]
    answer = client.post("/explore/attention", json={"messages": chat, "layer": 0, "head": 0}).json()
    assert answer["ids"] == m.tokenizer.encode(m.apply_chat_template(question) + "The capital of France is Paris.")


@pytest.mark.parametrize("body, param", [
    ({"text": "", "layer": 0, "head": 0}, "text"),
    ({"text": "Hi", "layer": 30, "head": 0}, "layer"),
    ({"text": "Hi", "layer": -1, "head": 0}, "layer"),
    ({"text": "Hi", "layer": "3", "head": 0}, "layer"),
    ({"text": "Hi", "layer": 0, "head": 9}, "head"),
    ({"text": "Hi", "layer": 0}, "head"),
    ({"layer": 0, "head": 0}, "text"),
    ({"text": "Hi", "ids": [1, 2], "layer": 0, "head": 0}, "ids"),
    ({"ids": [49152], "layer": 0, "head": 0}, "ids"),
    ({"ids": [], "layer": 0, "head": 0}, "ids"),
    ({"text": "word " * (MAX_TOKENS + 10), "layer": 0, "head": 0}, "text"),
    ({"messages": [{"role": "user"}], "layer": 0, "head": 0}, "messages"),
    ({"messages": [{"role": "assistant", "content": "Hi"}], "layer": 0, "head": 0}, "messages"),
    ({"messages": [{"role": "wizard", "content": "Hi"}], "layer": 0, "head": 0}, "messages"),  # as the chat API
])
def test_bad_attention_requests_are_400s(client, body, param):
    response = client.post("/explore/attention", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("body, param", [
    ({"text": "Hi", "k": 0}, "k"),
    ({"text": "Hi", "k": 21}, "k"),
    ({"text": "Hi", "last_only": "yes"}, "last_only"),
    ({"text": 5}, "text"),
])
def test_bad_lens_requests_are_400s(client, body, param):
    response = client.post("/explore/lens", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_body_that_is_not_a_json_object_is_a_400(client):
    for content in (b"{not json", b"[1, 2]", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):  # (nested too deep)
        response = client.post("/explore/lens", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_page_loads_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    sources = [page.text] + [client.get(f"/explore/static/{name}").text for name in ("explorer.js", "explorer.css")]
    assert sorted(p.name for p in STATIC.iterdir()) == ["explorer.css", "explorer.html", "explorer.js"]
    for text in sources:
        assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I)  # no CDN, no absolute URL
        assert not re.search(r"@import|import\s*\(|\bimport\s+.*\bfrom\b", text)  # no modules pulled in
    # every URL the script fetches is a path on this server
    assert set(re.findall(r"""(?:fetch|postJSON)\(\s*["'`]([^"'`]+)""", sources[1])) == {
        "/explore/info", "/explore/attention", "/explore/lens"}
    assert client.get("/explore/static/../explorer.py").status_code == 404


# ----- the page in a real browser -----

def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_explorer_in_headless_chromium(lucid_smollm):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    from lucidlm.server.testing import serve_in_thread

    n_layers = lucid_smollm.config.n_layers
    with serve_in_thread(create_app(lucid_smollm)) as base, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1200, "height": 1000})
            tab.set_default_timeout(60_000)
            outside = []

            def only_this_server(route):
                if route.request.url.startswith(base):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            tab.route("**/*", only_this_server)  # prove it works offline
            errors = []
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(base + "/")
            tab.wait_for_selector("body[data-ready=true]")
            heads = lucid_smollm.config.n_heads
            assert f"{n_layers} layers × {heads} heads" in tab.locator("#model-info").text_content()

            # a prompt: tokens stream in, each coloured by its probability
            tab.fill("#input", "The capital of France is")
            tab.fill("#max-tokens", "12")
            tab.click("#generate")
            tokens = tab.locator("#output .token")
            tab.wait_for_function("document.querySelectorAll('#output .token').length >= 8")
            colours = tokens.evaluate_all("spans => spans.map(s => getComputedStyle(s).backgroundColor)")
            assert all(re.fullmatch(r"rgb\(\d+, \d+, \d+\)", c) for c in colours), colours  # opaque colours
            assert len(set(colours)) > 1  # probabilities differ, so do colours

            # hovering a token shows its alternatives with probabilities, the chosen one marked
            tokens.nth(0).hover()
            tooltip = tab.locator("#tooltip")
            assert tooltip.is_visible()
            rows = tooltip.locator("tr")
            assert rows.count() == 5
            percents = [float(x) for x in re.findall(r"([\d.]+)%", tooltip.locator("table").inner_text())]
            assert len(percents) == 5 and percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.05
            assert tooltip.locator("tr.chosen").count() == 1  # greedy: the chosen token is the most likely
            assert rows.nth(0).get_attribute("class") == "chosen"

            # after generation: the heatmap of the text so far; pick a layer and a head
            tab.wait_for_selector("#heatmap[data-layer]")
            tab.select_option("#layer", "3")
            tab.select_option("#head", "2")
            canvas = tab.wait_for_selector("#heatmap[data-layer='3'][data-head='2']")
            n_tokens = int(canvas.get_attribute("data-tokens"))
            assert n_tokens == len(lucid_smollm.tokenizer.encode("The capital of France is")) + tokens.count()
            pixels = canvas.evaluate("""c => {
                const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                const colours = new Set();
                let blue = 0;
                for (let i = 0; i < d.length; i += 4) {
                  colours.add(d[i] + "," + d[i + 1] + "," + d[i + 2]);
                  if (d[i + 2] > d[i] + 40) blue++;  // attention cells are shades of blue
                }
                return {size: [c.width, c.height], colours: colours.size, blue};
            }""")
            assert min(pixels["size"]) > n_tokens and pixels["colours"] > 20 and pixels["blue"] > 100, pixels

            # the logit lens: one row per layer, one column per position, cells coloured by probability
            tab.wait_for_selector("#lens tbody tr")
            assert tab.locator("#lens tbody tr").count() == n_layers
            assert tab.locator("#lens thead th").count() == n_tokens + 1
            assert tab.locator("#lens tbody tr.final td").first.get_attribute("style").startswith("background")

            tokens.nth(1).hover()
            OUT.mkdir(exist_ok=True)
            tab.screenshot(path=str(OUT / "explorer.png"), full_page=True)

            # chat mode: the reply streams in through /v1/chat/completions
            tab.check("input[value=chat]")
            assert tokens.count() == 0
            tab.fill("#input", "What is the capital of France?")
            tab.click("#generate")
            tab.wait_for_function("document.querySelectorAll('#output .assistant .token').length >= 3")
            tab.wait_for_selector("#generate:not([disabled])")
            assert "What is the capital of France?" in tab.locator("#output .user").text_content()
            assert errors == [] and outside == []
        finally:
            browser.close()
