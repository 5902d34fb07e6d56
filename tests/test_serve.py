"""`cfjax serve` (issue 19): every API endpoint with good and bad input, sessions kept apart,
and the page in Debian's Chromium driven by Playwright."""

from __future__ import annotations

import json

import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cfjax
from cfjax.core.model import init_params

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cfjax.serve.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from test_counterfactual import _train_spm

    config = cfjax.preset("tiny")
    tok = _train_spm(tmp_path_factory.mktemp("spm"), seed=0)
    return cfjax.LM(config, init_params(config, jax.random.key(0), scale=4.0), tok, "tiny")


@pytest.fixture(scope="module")
def app(lm):
    return create_app(lm, max_new_tokens=64)


def _client(app, host: str = "127.0.0.1"):
    return TestClient(app, base_url=f"http://{host}")


GEN = {"prompt": "the captain sailed", "seed": 3, "temperature": 1.0, "max_new_tokens": 24}


def test_generate_matches_the_library(app, lm):
    c = _client(app)
    r = c.post("/api/generate", json=GEN)
    assert r.status_code == 200, r.text
    view = r.json()["factual"]
    want = cfjax.generate(lm, GEN["prompt"], key=3, sampler=cfjax.Sampler(1.0), max_new_tokens=24)
    assert [t["id"] for t in view["tokens"]] == want.tokens[: len(view["tokens"])]
    assert "".join(t["text"] for t in view["tokens"]) == want.text
    assert all(0 < t["p"] <= 1 for t in view["tokens"])
    # Streamed: text lines as produced, then the same view.
    lines = [
        json.loads(x)
        for x in c.post("/api/generate", json={**GEN, "stream": True}).text.splitlines()
    ]
    assert "".join(x.get("text", "") for x in lines[:-1]) == want.text
    assert len(lines) - 1 > 2  # pieces every few tokens, not one per 64-step chunk
    assert [t["id"] for t in lines[-1]["factual"]["tokens"]] == [t["id"] for t in view["tokens"]]


def test_counterfactual_and_interventional(app, lm):
    c = _client(app)
    fact = c.post("/api/generate", json=GEN).json()["factual"]
    cands = c.get("/api/candidates", params={"trace_id": fact["id"], "position": 5}).json()
    assert cands["factual"] == fact["tokens"][5]["id"] and len(cands["candidates"]) == 10
    ps = [x["p"] for x in cands["candidates"]]
    assert ps == sorted(ps, reverse=True) and sum(ps) <= 1.0 + 1e-5
    choice = next(x["id"] for x in cands["candidates"] if x["id"] != cands["factual"])
    r = c.post("/api/counterfactual", json={"trace_id": fact["id"], "position": 5, "token_id": choice, "samples": 2})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    cf = body["counterfactual"]
    assert [t["id"] for t in cf["tokens"][:5]] == [t["id"] for t in fact["tokens"][:5]]
    assert (
        cf["tokens"][5]["id"] == choice
        and cf["tokens"][5]["changed"]
        and cf["first_divergence"] == 5
    )
    assert not any(t["changed"] for t in cf["tokens"][:5])
    # The same as the library's counterfactual of the same trace.
    trace = cfjax.Trace.from_json(c.get(f"/api/traces/{fact['id']}.json").text)
    want = cfjax.counterfactual(lm, trace, cfjax.ReplaceTokens(5, [choice]))
    assert [t["id"] for t in cf["tokens"]] == want.tokens[: len(cf["tokens"])]
    assert len(body["interventional"]) == 2
    html = c.get("/api/diff.html", params={"factual": fact["id"], "other": cf["id"]}).text
    assert "<html>" in html and "diverges at token 5" in html
    # A prompt and sampler edit, and a reload: the state comes back.
    r = c.post("/api/counterfactual", json={"trace_id": fact["id"], "prompt": "a calm sea", "temperature": 0.5, "samples": 0})  # fmt: skip
    assert (
        r.status_code == 200
        and r.json()["counterfactual"]["interventions"][0]["type"] == "EditPrompt"
    )
    assert (
        c.get("/api/state").json()["view"]["counterfactual"]["id"]
        == r.json()["counterfactual"]["id"]
    )


def test_abduct_counts_distinct_counterfactuals(app):
    c = _client(app)
    r = c.post("/api/abduct", json={"prompt": "the captain sailed", "observed": "the sea was calm and the dog slept",
                                    "old": "calm", "new": "wild", "samples": 8, "seed": 1})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["samples"] == 8 and sum(a["count"] for a in body["abducted"]) == 8
    assert all("wild" in a["text"] for a in body["abducted"])
    assert body["observed"]["text"] == "the sea was calm and the dog slept"


@pytest.mark.parametrize(
    "path, payload, status, message",
    [
        ("/api/generate", {**GEN, "prompt": "  "}, 400, "the prompt is empty"),
        ("/api/generate", {**GEN, "max_new_tokens": 10_000}, 400, "over this server's limit of 64"),
        ("/api/generate", {**GEN, "temperature": -1}, 422, "temperature"),
        ("/api/generate", {**GEN, "seed": 2**40}, 422, "seed"),
        ("/api/counterfactual", {"trace_id": "nope", "position": 1, "token_id": 3}, 404, "no trace 'nope'"),
        ("/api/abduct", {"prompt": "x", "observed": "a b", "old": "zzz", "new": "y"}, 400, "does not occur"),
        ("/api/abduct", {"prompt": "x", "observed": "a b", "old": "", "new": "y"}, 400, "the text to find is empty"),
    ],
)  # fmt: skip
def test_bad_input_is_a_4xx_with_a_message(app, path, payload, status, message):
    r = _client(app).post(path, json=payload)
    assert r.status_code == status and message in json.dumps(r.json()), r.text


def test_bad_edits_and_malformed_json(app):
    c = _client(app)
    fact = c.post("/api/generate", json=GEN).json()["factual"]
    for edit, message in (({"position": 999, "token_id": 3}, "outside the response"),
                          ({"position": 2, "token_id": 10**6}, "unknown token id"),
                          ({}, "no intervention")):  # fmt: skip
        r = c.post("/api/counterfactual", json={"trace_id": fact["id"], **edit})
        assert r.status_code == 400 and message in r.json()["detail"], r.text
    r = c.post("/api/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert (
        c.get("/api/candidates", params={"trace_id": fact["id"], "position": -1}).status_code == 400
    )
    assert c.get("/static/../app.py").status_code == 404


def test_sessions_do_not_see_each_other(app):
    a, b = _client(app), _client(app)
    fact = a.post("/api/generate", json=GEN).json()["factual"]
    assert a.get(f"/api/traces/{fact['id']}.json").status_code == 200
    assert b.get(f"/api/traces/{fact['id']}.json").status_code == 404
    assert b.get("/api/state").json()["view"] is None
    assert b.post("/api/counterfactual", json={"trace_id": fact["id"], "position": 1, "token_id": 3}).status_code == 404  # fmt: skip


CHROMIUM = "/usr/bin/chromium"


def _generated(p, server: str, width: int, height: int, **fields: str):
    """(browser, page): Debian's Chromium at `width` x `height` on the explorer, with a factual
    response of "the captain sailed" generated (form `fields` filled first)."""
    from pathlib import Path

    from playwright.sync_api import expect

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test installs it)")
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(server)
    page.fill("#prompt", "the captain sailed")
    for name, value in fields.items():
        page.fill(f"#{name}", value)
    page.click("#generate")
    expect(page.locator("#factual .tok").first).to_be_visible(timeout=60_000)
    return browser, page


@pytest.fixture(scope="module")
def server(app):
    """The app on a free loopback port, in a thread (uvicorn)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_the_page_in_chromium(server, tmp_path):
    """Generate, click a token, pick a replacement: the counterfactual panel keeps the prefix,
    shows the chosen token and highlights what the API says changed; observed text gets counts;
    a reload restores the panels. A screenshot is saved (tests/artifacts/serve.png)."""
    from pathlib import Path

    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser, page = _generated(p, server, 1400, 900, seed="3", max_new_tokens="24")
        tokens = page.locator("#factual .tok")
        factual = tokens.all_inner_texts()
        assert tokens.nth(5).get_attribute("title").startswith("token 5 (id ")
        tokens.nth(5).click()
        first = page.locator("#candidates .candidate").first
        expect(first).to_be_visible(timeout=30_000)
        chosen_id = int(first.get_attribute("data-id"))
        first.click()
        cf = page.locator("#counterfactual .tok")
        expect(cf.first).to_be_visible(timeout=60_000)
        # What the API reports for this counterfactual, from the same session's state.
        state = page.evaluate("fetch('/api/state').then(r => r.json())")["view"]
        api_cf = state["counterfactual"]
        assert api_cf["tokens"][5]["id"] == chosen_id
        shown = cf.all_inner_texts()
        assert shown[:5] == factual[:5]  # the kept prefix, unchanged
        assert shown[5] == api_cf["tokens"][5]["text"]
        highlighted = [int(x) for x in page.eval_on_selector_all("#counterfactual .tok.changed", "els => els.map(e => e.dataset.i)")]  # fmt: skip
        assert (
            highlighted == [t["i"] for t in api_cf["tokens"] if t["changed"]] and 5 in highlighted
        )
        assert page.locator("#counterfactual .divergence").count() == 1
        assert page.locator("#interventional .sample").count() == 1
        out = Path(__file__).parent / "artifacts"
        out.mkdir(exist_ok=True)
        page.screenshot(path=str(out / "serve.png"), full_page=True)
        # A reload keeps the traces (server-side session).
        page.reload()
        expect(page.locator("#counterfactual .tok").first).to_be_visible(timeout=30_000)
        assert page.locator("#counterfactual .tok").all_inner_texts() == shown
        # Issue 32: the reload restored the factual's settings, so the button sends no edit
        # nobody asked for; a changed temperature alone is a ChangeSampler alone.
        page.fill("#temperature", "1")  # the page's default, which the factual used
        assert (
            page.input_value("#prompt") == "the captain sailed" and page.input_value("#seed") == "3"
        )
        page.click("#rerun")
        expect(page.locator("#error")).to_contain_text("nothing differs", timeout=10_000)
        page.fill("#temperature", "0.3")
        page.click("#rerun")
        expect(page.locator("#error")).to_have_text("", timeout=10_000)
        # The click shows the busy state at once; it ends when the page has applied the answer.
        expect(page.locator("#busy")).to_be_hidden(timeout=60_000)
        view = page.evaluate("fetch('/api/state').then(r => r.json())")["view"]
        dom = page.eval_on_selector_all(
            "#counterfactual .tok", "els => els.map(e => e.textContent)"
        )
        assert dom == [t["text"] for t in view["counterfactual"]["tokens"]]
        assert view["counterfactual"]["interventions"] == [{"type": "ChangeSampler", "temperature": 0.3}]  # fmt: skip
        first = view["counterfactual"]["first_divergence"]
        ids = [t["id"] for t in view["counterfactual"]["tokens"]]
        factual_ids = [t["id"] for t in view["factual"]["tokens"]]
        assert first == next((i for i, (a, b) in enumerate(zip(factual_ids, ids, strict=False)) if a != b), len(ids))  # fmt: skip
        marked = page.eval_on_selector(
            "#counterfactual .divergence + .tok", "e => Number(e.dataset.i)"
        )
        assert marked == first
        # Observed text: distinct counterfactuals with their counts.
        page.fill("#observed", "the sea was calm and the dog slept")
        page.fill("#old", "calm")
        page.fill("#new", "wild")
        page.fill("#samples", "6")
        page.click("#abduct")
        rows = page.locator("#abducted .abducted")
        expect(rows.first).to_be_visible(timeout=60_000)
        counts = [int(x.split("x")[0]) for x in page.locator("#abducted .count").all_inner_texts()]
        assert sum(counts) == 6
        assert page.locator("#abducted a", has_text="HTML diff").count() == len(counts)
        # A reload restores the observed text, its edit and its counts together (issue 32).
        page.reload()
        expect(page.locator("#abducted .abducted").first).to_be_visible(timeout=30_000)
        assert page.input_value("#observed") == "the sea was calm and the dog slept"
        assert (page.input_value("#old"), page.input_value("#new")) == ("calm", "wild")
        assert [
            int(x.split("x")[0]) for x in page.locator("#abducted .count").all_inner_texts()
        ] == counts
        # An abduction's error shows beside the abduction, as one sentence (issue 32).
        page.fill("#old", "zebra")
        page.click("#abduct")
        expect(page.locator("#abduct-error")).to_have_text("'zebra' does not occur in the observed text", timeout=30_000)  # fmt: skip
        assert page.inner_text("#error") == ""
        page.fill("#temperature", "-1")
        page.fill("#old", "calm")
        page.click("#abduct")
        expect(page.locator("#abduct-error")).to_contain_text("temperature: ", timeout=30_000)
        page.fill("#temperature", "1")
        # Bad input: a readable message in the page, no stack trace.
        page.fill("#prompt", "   ")
        page.click("#generate")
        expect(page.locator("#error")).to_have_text("the prompt is empty", timeout=30_000)
        browser.close()


def test_the_page_at_390px_busy_state_and_escape(server):
    """Issue 32: at a phone's width the panels stack with no horizontal overflow; a slow request
    shows the busy state (buttons disabled, elapsed time, the panel dimmed); Esc closes the token
    picker, which shows the factual token's own probability. A screenshot is saved."""
    from pathlib import Path

    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser, page = _generated(p, server, 390, 844, max_new_tokens="16")
        tokens = page.locator("#factual .tok")
        tokens.nth(3).click()
        expect(page.locator("#picker")).to_be_visible(timeout=30_000)
        assert "p = " in page.inner_text("#picker-title")
        page.keyboard.press("Escape")
        expect(page.locator("#picker")).to_be_hidden()
        # A request held back by the test: the page shows that it works meanwhile.
        release = []
        page.route("**/api/counterfactual", lambda route: release.append(route))
        page.fill("#temperature", "0.3")
        page.click("#rerun")
        expect(page.locator("#busy")).to_be_visible()
        expect(page.locator("#generate")).to_be_disabled()
        assert "stale" in page.get_attribute("#counterfactual", "class")
        page.wait_for_timeout(300)
        assert page.inner_text("#busy").startswith("computing the counterfactual")
        release[0].continue_()
        page.unroute("**/api/counterfactual")
        expect(page.locator("#busy")).to_be_hidden(timeout=60_000)
        expect(page.locator("#generate")).to_be_enabled()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        # A chain of edits: a token of the counterfactual is edited, and that counterfactual
        # becomes the factual of the next one.
        before = page.locator("#counterfactual .tok").all_inner_texts()
        page.locator("#counterfactual .tok").nth(4).click()
        page.locator("#candidates .candidate").first.click()
        expect(page.locator("#busy")).to_be_hidden(timeout=60_000)
        assert page.locator("#factual .tok").all_inner_texts() == before
        view = page.evaluate("fetch('/api/state').then(r => r.json())")["view"]
        assert view["counterfactual"]["interventions"][-1]["position"] == 4
        boxes = [page.locator(f"#panels .panel >> nth={i}").bounding_box() for i in range(3)]
        assert boxes[0]["y"] < boxes[1]["y"] < boxes[2]["y"]  # stacked, not side by side
        out = Path(__file__).parent / "artifacts"
        out.mkdir(exist_ok=True)
        page.screenshot(path=str(out / "serve-390.png"), full_page=True)
        browser.close()


def test_concurrent_sessions_get_their_own_results(app, lm):
    """Two users at once (threads, as the server runs requests): each gets the library's
    answer for its own request, and neither sees the other's trace."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{**GEN, "seed": s, "max_new_tokens": 40} for s in (11, 12)]

    def one(body):
        c = _client(app)
        view = c.post("/api/generate", json=body).json()["factual"]
        return c, view

    with ThreadPoolExecutor(2) as pool:
        (ca, va), (cb, vb) = pool.map(one, bodies)
    for body, view in zip(bodies, (va, vb), strict=True):
        want = cfjax.generate(lm, GEN["prompt"], key=body["seed"], sampler=cfjax.Sampler(1.0), max_new_tokens=40)  # fmt: skip
        assert [t["id"] for t in view["tokens"]] == want.tokens[: len(view["tokens"])]
    assert ca.get(f"/api/traces/{vb['id']}.json").status_code == 404
    assert cb.get(f"/api/traces/{va['id']}.json").status_code == 404


# --- issue 35: the Host, strangers' sessions and the work per request are bounded ----------------


def test_only_the_bound_host_names_are_served(app, lm):
    assert _client(app, "localhost:8000").get("/api/info").status_code == 200
    r = _client(app, "evil.example").post("/api/generate", json=GEN)
    assert r.status_code == 400 and "host 'evil.example' is not served" in r.json()["detail"]
    assert _client(app, "127.0.0.1.evil:80").get("/api/info").status_code == 400
    more = create_app(lm, allowed_hosts=("127.0.0.1", "lab.example"))
    assert _client(more, "lab.example").get("/api/info").status_code == 200


def test_strangers_neither_create_nor_evict_sessions(lm):
    from cfjax.serve.sessions import Sessions

    now = [0.0]
    app = create_app(lm, max_new_tokens=24, sessions=Sessions(max_sessions=2, idle_s=60, clock=lambda: now[0]))  # fmt: skip
    user = _client(app)
    fact = user.post("/api/generate", json=GEN).json()["factual"]
    for _ in range(50):  # cookieless reads: no session is made, none is evicted
        r = _client(app).get("/api/state")
        assert r.json() == {"view": None} and "set-cookie" not in r.headers
    other = _client(app)
    assert other.post("/api/generate", json=GEN).status_code == 200
    now[0] = 59.0  # both sessions active: a third is refused, nothing is dropped
    r = _client(app).post("/api/generate", json=GEN)
    assert r.status_code == 503 and "2 active sessions" in r.json()["detail"]
    assert user.get(f"/api/traces/{fact['id']}.json").status_code == 200
    now[0] = 125.0  # `other` idle for over a minute (user read at 59): its slot is reused
    assert user.get("/api/state").json()["view"]["factual"]["id"] == fact["id"]
    now[0] = 130.0
    assert _client(app).post("/api/generate", json=GEN).status_code == 200
    assert user.get(f"/api/traces/{fact['id']}.json").status_code == 200


def test_every_request_is_bounded_by_the_servers_limits(lm):
    app = create_app(lm, max_new_tokens=24, max_prompt_tokens=16, max_samples=4)
    c = _client(app)
    r = c.post("/api/generate", json={"prompt": "the captain sailed"})  # default 64 > 24: lowered
    assert r.status_code == 200 and len(r.json()["factual"]["tokens"]) <= 24
    fact = r.json()["factual"]
    last = len(fact["tokens"]) - 1
    assert last >= 16  # so that the 9 tokens of the edit text below end past 24
    long_text = " ".join(["the sea"] * 30)
    cases = [
        ("/api/generate", {"prompt": long_text}, "over 16 tokens"),
        ("/api/generate", {"prompt": "x " * 100_000}, "over 512 characters, this server's limit for 16 tokens"),
        ("/api/generate", {"prompt": "hi", "system": long_text}, "system message has over 16"),
        ("/api/counterfactual", {"trace_id": fact["id"], "position": last, "text": " the sea the sea the sea the sea"}, "limit of 24 new tokens"),
        ("/api/counterfactual", {"trace_id": fact["id"], "prompt": long_text}, "over 16 tokens"),
        ("/api/counterfactual", {"trace_id": fact["id"], "position": 1, "token_id": 3, "samples": 5}, "limit of 4"),
        ("/api/abduct", {"prompt": "x", "observed": "a b", "old": "a", "new": "c", "samples": 5}, "limit of 4"),
        ("/api/abduct", {"prompt": "x", "observed": long_text, "old": "sea", "new": "c", "samples": 2}, "over 16 tokens"),
    ]  # fmt: skip
    for path, body, message in cases:
        r = c.post(path, json=body)
        assert r.status_code == 400 and message in r.json()["detail"], (path, r.text)
    edit = {"trace_id": fact["id"], "position": 2, "text": " the sea"}
    r = c.post("/api/counterfactual", json=edit)
    assert r.status_code == 200 and len(r.json()["counterfactual"]["tokens"]) <= 24


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_any_request_body_is_answered_within_the_limits(lm, data):
    """Random bodies for every POST endpoint, any Host, with or without a session: never a 500,
    and every answer within the server's limits (new tokens, samples)."""
    app = _bounded_app(lm)
    host = data.draw(st.sampled_from(["127.0.0.1", "localhost", "evil.example", "127.0.0.1.evil"]))
    client = _client(app, host)
    fact_id = "none"
    if host in ("127.0.0.1", "localhost") and data.draw(st.booleans()):  # a session with a trace
        r = client.post("/api/generate", json={"prompt": "the sea", "max_new_tokens": 6})
        assert r.status_code == 200, r.text
        fact_id = r.json()["factual"]["id"]
    numbers = st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False), st.none())  # fmt: skip
    texts = st.one_of(st.text(max_size=40), st.just("the sea " * 40), st.none())
    path = data.draw(st.sampled_from(["/api/generate", "/api/counterfactual", "/api/abduct"]))
    body = {
        "prompt": data.draw(texts), "system": data.draw(texts), "observed": data.draw(texts),
        "old": data.draw(texts), "new": data.draw(texts), "text": data.draw(texts),
        "trace_id": data.draw(st.sampled_from([fact_id, "nope", None])),
        "position": data.draw(numbers), "token_id": data.draw(numbers),
        "max_new_tokens": data.draw(numbers), "samples": data.draw(numbers),
        "seed": data.draw(numbers), "temperature": data.draw(numbers),
        "top_k": data.draw(numbers), "top_p": data.draw(numbers),
    }  # fmt: skip
    body = {k: v for k, v in body.items() if v is not None and data.draw(st.booleans())}
    r = client.post(path, json=body)
    assert r.status_code in (200, 400, 404, 409, 422, 503), (path, body, r.text)
    if host not in ("127.0.0.1", "localhost"):
        assert r.status_code == 400
    if r.status_code == 200:
        payload = r.json()
        traces = [payload.get("factual"), payload.get("counterfactual"), payload.get("observed"),
                  *payload.get("interventional", []), *(a["trace"] for a in payload.get("abducted", []))]  # fmt: skip
        assert all(len(t["tokens"]) <= LIMITS["max_new_tokens"] for t in traces if t)
        assert len(payload.get("interventional", [])) <= LIMITS["max_samples"]
        assert payload.get("samples", 0) <= LIMITS["max_samples"]
    else:
        assert isinstance(r.json()["detail"], (str, list))


LIMITS = {"max_new_tokens": 8, "max_prompt_tokens": 12, "max_samples": 3}


def _bounded_app(lm, cache={}):  # noqa: B006 (one app for all examples: its compiled programs)
    if "app" not in cache:
        cache["app"] = create_app(lm, **LIMITS)
    return cache["app"]


def test_each_panel_says_what_it_is(app, lm):
    """Issue 32: a view carries its intervention in words, its settings and, for a
    counterfactual or interventional sample, how many tokens after the edit equal the factual."""
    from cfjax.present import kept_after_edit

    c = _client(app)
    fact = c.post("/api/generate", json=GEN).json()["factual"]
    assert fact["about"].startswith("tiny: temperature 1.0, mechanism gumbel, seed 3; prompt 'the captain sailed'")  # fmt: skip
    r = c.post("/api/counterfactual", json={"trace_id": fact["id"], "position": 2, "token_id": 7, "samples": 1})  # fmt: skip
    cf = r.json()["counterfactual"]
    factual_trace = cfjax.Trace.from_json(c.get(f"/api/traces/{fact['id']}.json").text)
    cf_trace = cfjax.Trace.from_json(c.get(f"/api/traces/{cf['id']}.json").text)
    same, total = kept_after_edit(factual_trace, cf_trace)
    assert cf["about"].startswith("replace token 2 by ")
    assert cf["about"].endswith(f"{same}/{total} tokens after the edit equal the factual ones")
    assert "tokens after the edit" in r.json()["interventional"][0]["about"]


# --- conversations and attribution (issue 34) ----------------------------------------------------

CHAT = {"messages": ["the captain sailed", "a calm sea"], "seed": 3, "max_new_tokens": 12}


def same_turns(view: dict, conv) -> None:
    """The page's turns show the conversation's tokens (all but a final stop token)."""
    assert len(view["turns"]) == len(conv.turns)
    for shown, turn in zip(view["turns"], conv.turns, strict=True):
        ids = [x["id"] for x in shown["assistant"]["tokens"]]
        assert ids == turn.tokens[: len(ids)] and len(ids) >= len(turn.tokens) - turn.stopped


def test_converse_and_a_counterfactual_turn_match_the_library(app, lm):
    c = _client(app)
    r = c.post("/api/converse", json=CHAT)
    assert r.status_code == 200, r.text
    view = r.json()["conversation"]
    conv = cfjax.converse(lm, CHAT["messages"], key=3, max_new_tokens=12)
    assert [t["user"] for t in view["turns"]] == CHAT["messages"]
    same_turns(view, conv)
    # The whole conversation downloads as JSON and loads as a Conversation.
    saved = cfjax.Conversation.from_json(c.get(f"/api/traces/{view['id']}.json").text)
    assert [t.tokens for t in saved.turns] == [t.tokens for t in conv.turns]
    edit = {"conversation_id": view["id"], "turn": 0, "position": 2, "token_id": 7}
    r = c.post("/api/conversation/counterfactual", json=edit)
    assert r.status_code == 200, r.text
    other = r.json()["counterfactual_conversation"]
    assert (
        r.json()["conversation"] == view
    )  # the factual's view is kept, its turns not stored again
    want = cfjax.counterfactual(lm, conv, cfjax.AtTurn(0, cfjax.ReplaceTokens(2, [7])))
    same_turns(other, want)
    assert other["turns"][0]["assistant"]["tokens"][2]["changed"]
    assert c.get("/api/state").json()["view"]["counterfactual_conversation"]["id"] == other["id"]
    r = c.post("/api/conversation/counterfactual", json={**edit, "position": None, "prompt": "a storm"})  # fmt: skip
    assert r.json()["counterfactual_conversation"]["turns"][0]["user"] == "a storm"


def test_attribution_matches_the_library(app, lm):
    from cfjax.causal.attribution import attribute

    c = _client(app)
    fact = c.post("/api/generate", json=GEN).json()["factual"]
    r = c.post("/api/attribute", json={"trace_id": fact["id"]})
    assert r.status_code == 200, r.text
    a = r.json()["attribution"]
    trace = cfjax.Trace.from_json(c.get(f"/api/traces/{fact['id']}.json").text)
    want = attribute(lm, trace)
    assert [(x["text"], x["distance"], x["interventional_distance"]) for x in a["rows"]] == [
        (e.text, e.distance, e.interventional_distance) for e in want
    ]
    assert a["prompt"] == "the captain sailed" and a["rows"][1]["trace"]["prompt"] == "the sailed"


@pytest.mark.parametrize(
    "path, payload, message",
    [
        ("/api/converse", {**CHAT, "messages": ["ok", " "]}, "the prompt is empty"),
        ("/api/converse", {**CHAT, "messages": ["w"] * 100}, "samples 100 is over this server's limit"),
        ("/api/converse", {**CHAT, "max_new_tokens": 10_000}, "over this server's limit of 64"),
        ("/api/conversation/counterfactual", {"conversation_id": "nope", "turn": 0, "prompt": "x"}, "no trace 'nope'"),
        ("/api/attribute", {"trace_id": "nope"}, "no trace 'nope'"),
    ],
)  # fmt: skip
def test_conversation_and_attribution_input_is_checked(lm, path, payload, message):
    app = create_app(lm, max_new_tokens=64, max_samples=8)
    r = _client(app).post(path, json=payload)
    assert r.status_code in (400, 404) and message in r.json()["detail"], r.text


def test_a_conversation_is_not_a_trace_and_long_prompts_are_not_attributed(lm):
    c = _client(create_app(lm, max_new_tokens=64, max_samples=4))
    conv = c.post("/api/converse", json=CHAT).json()["conversation"]
    for path, body in (("/api/counterfactual", {"trace_id": conv["id"], "position": 1, "token_id": 3}),
                       ("/api/attribute", {"trace_id": conv["id"]})):  # fmt: skip
        r = c.post(path, json=body)
        assert r.status_code == 400 and "is a conversation" in r.json()["detail"], r.text
    fact = c.post("/api/generate", json={**GEN, "prompt": "the captain sailed across a calm sea"}).json()["factual"]  # fmt: skip
    r = c.post("/api/attribute", json={"trace_id": fact["id"]})
    assert r.status_code == 400 and "samples 7 is over this server's limit of 4" in r.json()["detail"]  # fmt: skip
    r = c.post("/api/conversation/counterfactual", json={"conversation_id": conv["id"], "turn": 5, "prompt": "x"})  # fmt: skip
    assert r.status_code == 400 and "turns 0 to 1" in r.json()["detail"]


def test_attribution_and_conversations_in_chromium(server):
    """The prompt's words coloured by their effect (a click shows that word's counterfactual),
    and a conversation whose answer tokens open the picker: the edit replays the later turns
    beside the factual chat. A screenshot is saved (tests/artifacts/serve-chat.png)."""
    from pathlib import Path

    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser, page = _generated(p, server, 1400, 1100, seed="3", max_new_tokens="16")
        page.click("#attribute")
        words = page.locator("#attributed .word")
        expect(words.first).to_be_visible(timeout=60_000)
        assert words.all_inner_texts() == ["the", "captain", "sailed"]
        rows = page.evaluate("fetch('/api/state').then(r => r.json())")["view"]["attribution"][
            "rows"
        ]
        assert words.nth(1).get_attribute("title").startswith(f"without \"captain\": distance {rows[1]['distance']:.2f}")  # fmt: skip
        words.nth(1).click()
        shown = page.locator("#counterfactual .tok").all_inner_texts()
        assert shown == [t["text"] for t in rows[1]["trace"]["tokens"]]

        page.fill("#chat-script", "the captain sailed\na calm sea")
        page.click("#converse")
        answers = page.locator("#chat .bubble.assistant")
        expect(answers.nth(1).locator(".tok").first).to_be_visible(timeout=60_000)
        assert page.locator("#chat .bubble.user").all_inner_texts() == ["the captain sailed", "a calm sea"]  # fmt: skip
        answers.nth(0).locator(".tok").nth(2).click()
        candidate = page.locator("#candidates .candidate").first
        expect(candidate).to_be_visible(timeout=30_000)
        chosen = int(candidate.get_attribute("data-id"))
        candidate.click()
        cf = page.locator("#chat-cf .bubble.assistant")
        expect(cf.nth(1).locator(".tok").first).to_be_visible(timeout=60_000)
        view = page.evaluate("fetch('/api/state').then(r => r.json())")["view"]
        other = view["counterfactual_conversation"]
        assert other["turns"][0]["assistant"]["tokens"][2]["id"] == chosen
        for k in range(2):
            assert cf.nth(k).locator(".tok").all_inner_texts() == [t["text"] for t in other["turns"][k]["assistant"]["tokens"]]  # fmt: skip
        # A user message edited in place: the counterfactual chat answers it and the turns after.
        page.once("dialog", lambda dialog: dialog.accept("a storm at night"))
        page.locator("#chat .bubble.user").nth(1).click()
        expect(page.locator("#chat-cf .bubble.user").nth(1)).to_have_text("a storm at night", timeout=60_000)  # fmt: skip
        other = page.evaluate("fetch('/api/state').then(r => r.json())")["view"]["counterfactual_conversation"]  # fmt: skip
        assert other["interventions"][-1]["interventions"] == [{"type": "EditPrompt", "prompt": "a storm at night", "system": None, "tokens": None}]  # fmt: skip
        kept = other["turns"][0]["assistant"]["tokens"]  # turn 0, before the edit: as it was
        assert [t["id"] for t in kept] == [t["id"] for t in view["conversation"]["turns"][0]["assistant"]["tokens"]]  # fmt: skip
        assert not any(t["changed"] for t in kept)
        out = Path(__file__).parent / "artifacts"
        out.mkdir(exist_ok=True)
        page.screenshot(path=str(out / "serve-chat.png"), full_page=True)
        browser.close()
