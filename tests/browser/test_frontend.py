"""The web/ extension in a real browser, against the official ComfyUI front end and a real ComfyUI server.

One module-scoped server (this checkout, --cpu, the pack + the tiny-model test kit, the comfyui-frontend-package
version the checkout pins) and one headless Chromium (Debian's, through Playwright). Four editor pages, each in a
fresh browser context:

0. ``stub``: memora.js replaced by an empty module (Playwright answers that request in place of the server): the
   console errors the front end shows on its own (1.49: 'ComfyApp graph accessed before initialization'), the
   baseline the other pages are compared with. Failed fetches of the front end's own (404s for absent user files,
   CSP-blocked model metadata downloads for its default graph) come and go with page timing and are left out: the
   extension makes no requests.
1. ``broken``: memora.js with a syntax error appended: the load check must report the extension missing and an
   error the stub page does not show.
2. the real extension: served once, registered once, no console error of its own; a graph of core nodes runs and
   leaves no trace of the extension; then the shipped ``example_workflows/memora_recovery.json`` is opened, shrunk
   to the tiny checkpoint (64 px, 2 sampling steps, inversion/regeneration 4 steps, 3 training updates), and queued
   as the Run button does. The page must show, compared with the server's own /history record and the files on
   disk: live chart points, the final loss, the saved LoRA's name, inversion/regeneration progress, the score tables
   and the nudity previews; the "Add LoraLoader" button (clicked with the mouse) must add a LoraLoader with that
   lora_name wired to the model (and CLIP) feeding the training node; the saved workflow, reopened, must restore the
   chart and the file name; node descriptions and input tooltips must show on hover.
3. ``sabotaged``: memora.js with its memora.train listener renamed and the loader's lora_name replaced by another
   file; the same checks must report both faults (events not reaching the chart, wrong file wired).

The checks are functions returning a list of problems, so the negative pages exercise exactly the assertions the
real extension passes. Artifacts (screenshots, saved workflow, each page's console) go to test-artifacts/browser/."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROBE = HERE / "page_probe.js"
WORKFLOW = ROOT / "example_workflows" / "memora_recovery.json"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
EXT_PATH = "/extensions/comfyui-memora/memora.js"
EXTENSION = "MemoRa.Frontend"
TRAIN = "MemoRaLoRATrain"
TRAIN_STEPS = 3
RUN_TIMEOUT_MS = 480_000
MAX_TABLE_ROWS = 12  # web/memora.js shows this many rows per score table

# Deliberate faults for the negative pages (each replacement must apply exactly once).
SYNTAX_ERROR = "\n)(  // deliberately broken copy\n"
WRONG_FILE = "memora/not_the_saved_file.safetensors"
SABOTAGE = [
    ("api.addEventListener(CONTRACT.events.train, onTrain)",
     'api.addEventListener(CONTRACT.events.train + ".disabled", onTrain)'),
    ('setWidgetValue(loader, "lora_name", filename)', f'setWidgetValue(loader, "lora_name", "{WRONG_FILE}")'),
]


# -- driving one editor page -------------------------------------------------------------------------------------------
class Editor:
    """One ComfyUI editor page in its own browser context, with everything it logs recorded."""

    def __init__(self, browser, url: str, transform=None, name: str = "page"):
        self.name = name
        self.context = browser.new_context(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
        self.page = self.context.new_page()
        self.console: list[dict] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.console.append(
            {"type": m.type, "text": m.text, "url": (m.location or {}).get("url", "")}))
        self.page.on("pageerror", lambda e: self.console.append(
            {"type": "pageerror", "text": str(e), "url": "", "stack": e.stack or ""}))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.add_init_script(path=str(PROBE))
        if transform is not None:
            def serve(route):
                response = route.fetch()
                route.fulfill(response=response, body=transform(response.text()),
                              headers={**response.headers, "content-type": "application/javascript"})
            self.page.route(f"**{EXT_PATH}", serve)
        t0 = time.monotonic()
        self.page.goto(url)
        # Ready: nodes registered and a graph shown (the extensions' setup has run by then).
        self.page.wait_for_function(
            "() => window.__memoraTest?.ready() && !!LiteGraph.registered_node_types.KSampler"
            " && (app.rootGraph ?? app.graph)._nodes.length > 0", timeout=180_000)
        try:
            self.page.wait_for_load_state("networkidle", timeout=15_000)
        except Exception:
            pass  # a page that keeps polling is still usable; the settle time below applies anyway
        self.page.wait_for_timeout(1500)
        self.js("() => __memoraTest.listen()")
        print(f"[browser test] {name}: editor ready in {time.monotonic() - t0:.1f} s")

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def errors(self) -> list[dict]:
        return [m for m in self.console if m["type"] in ("error", "pageerror")]

    def load(self, workflow: dict):
        self.js("(wf) => __memoraTest.load(wf)", workflow)
        self.page.wait_for_timeout(500)

    def queue_and_wait(self) -> dict:
        t0 = time.monotonic()
        self.js("() => __memoraTest.queue()")
        self.page.wait_for_function("() => __memoraTest.finished", timeout=RUN_TIMEOUT_MS)
        self.page.wait_for_timeout(500)  # the last executed messages and redraws
        finished = self.js("() => __memoraTest.finished")
        print(f"[browser test] {self.name}: run finished ({finished['type']}) in {time.monotonic() - t0:.1f} s")
        return finished

    def fit(self, ids=None):
        self.js("(ids) => __memoraTest.fit(ids)", ids)
        self.page.wait_for_timeout(400)

    def hover_tooltip(self, xy) -> str:
        """Rest the mouse at xy on the canvas; the front end's tooltip text ('' when none appears)."""
        self.page.mouse.move(xy[0] + 40, xy[1] + 40)
        self.page.mouse.move(xy[0], xy[1], steps=4)
        try:
            self.page.wait_for_selector(".node-tooltip", state="visible", timeout=3000)
        except Exception:
            return ""
        return self.page.inner_text(".node-tooltip").strip()

    def nodes(self, node_type: str) -> list[str]:
        return self.js("(t) => __memoraTest.nodesOfType(t).map(n => String(n.id))", node_type)

    def screenshot(self, name: str):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name))

    def close(self):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / f"{self.name}-console.json").write_text(json.dumps(self.console, indent=1))
        self.context.close()


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


# -- the checks (each returns the list of problems it found) -----------------------------------------------------------
def _norm(text: str) -> str:
    text = re.sub(r"blob:\S+", "blob:", text)
    text = re.sub(r":\d+:\d+", "", text)
    return re.sub(r"\b[0-9a-f]{8}-[0-9a-f-]{27}\b", "<uuid>", text)


OURS = re.compile(r"memora\.js|MemoRa\.Frontend|/extensions/comfyui-memora|\"memora\.", re.I)


def _ours(m: dict) -> bool:
    """A console message that names the extension: its file in a location or stack, its name, or one of its events
    (the front end logs listener errors as '[ComfyApi] Uncaught error in "memora.train" event listener')."""
    return bool(OURS.search(m["text"] + " " + m["url"] + " " + m.get("stack", "")))


def _network_noise(m: dict) -> bool:
    """The front end's own failed fetches: 404s for absent user files, CSP-blocked downloads of the default graph's
    model metadata. They come and go with page timing (seen in some pages and not in others); the extension makes no
    requests at all, so none of them can be its doing."""
    t = m["text"]
    # "Error fetching file size": the missing-models dialog asks each listed model's download site for the file's
    # size (the templates name their public models); the test machine has no network.
    return (t.startswith("Failed to load resource") or "Content Security Policy" in t
            or t.startswith("Fetch API cannot load") or t.startswith("Error fetching file size"))


def load_problems(load: dict, baseline: list[dict]) -> list[str]:
    """The extension is listed, fetched and registered exactly once, and adds no console error."""
    problems = []
    listed = [e for e in load["listed"] if e.endswith("/memora.js") or "comfyui-memora" in e]
    if listed != [EXT_PATH]:
        problems.append(f"/extensions should list {EXT_PATH} exactly once, lists {listed}")
    fetched = [u for u in load["requests"] if "comfyui-memora" in u]
    if len(fetched) != 1:
        problems.append(f"the page should request the pack's JS exactly once, requested {fetched}")
    registered = load["extensions"].count(EXTENSION)
    if registered != 1:
        problems.append(f"extension {EXTENSION} registered {registered} times (expected once)")
    own = [m for m in load["console"] if m["type"] in ("error", "warning", "pageerror") and _ours(m)]
    if own:
        problems.append(f"console errors or warnings naming the extension: {own}")
    known = {_norm(m["text"]) for m in baseline}
    extra = [m for m in load["console"] if m["type"] in ("error", "pageerror") and not _ours(m)
             and not _network_noise(m) and _norm(m["text"]) not in known]
    if extra:
        problems.append(f"console errors the front end does not show without the extension: {extra}")
    return problems


def training_problems(obs: dict, expected: dict) -> list[str]:
    """The chart got one live point per update, shows the final loss, and the saved LoRA's name is on the node."""
    problems = []
    panel = obs["train_panel"]
    n = len(expected["loss"])
    if n == 0:
        return ["the server recorded no memora_loss UI output for the training node"]
    if obs["raw"].get("memora.train", 0) != n:
        problems.append(f"the page received {obs['raw'].get('memora.train', 0)} memora.train events for {n} updates")
    if panel is None:
        return problems + ["the training node has no MemoRa panel"]
    if panel["livePoints"] != n:
        problems.append(f"the chart received {panel['livePoints']} live points during training, expected {n}")
    if panel["points"] != n:
        problems.append(f"the chart holds {panel['points']} points after the run, expected {n}")
    if panel["chartPixels"] < 50:
        problems.append(f"the chart canvas is (almost) empty: {panel['chartPixels']} painted pixels")
    final = expected["loss"][-1]["loss"]
    try:
        shown = float(panel["finalLoss"])
    except ValueError:
        shown = None
    if shown is None or abs(shown - final) > 1e-9 * max(1.0, abs(final)):
        problems.append(f"final loss on the node is {panel['finalLoss']!r}, the server's last loss is {final!r}")
    if not re.search(r"\bloss \S", panel["stats"]) or f"step {n}/{n}" not in panel["stats"]:
        problems.append(f"the stats line does not show the final step and loss: {panel['stats']!r}")
    if panel["loraName"] != expected["lora"] or not panel["buttonVisible"]:
        problems.append(f"the node shows LoRA {panel['loraName']!r} (button shown: {panel['buttonVisible']}), "
                        f"the server saved {expected['lora']!r}")
    return problems


def loader_problems(new_loaders: list[dict], expected_file: str, model_source: dict | None) -> list[str]:
    """Exactly one new LoraLoader, loading the saved file, wired to what feeds the training node's model input."""
    if len(new_loaders) != 1:
        return [f"the add-loader action created {len(new_loaders)} LoraLoader nodes, expected 1: {new_loaders}"]
    loader = new_loaders[0]
    problems = []
    if loader["lora_name"] != expected_file:
        problems.append(f"the new {loader['type']} loads {loader['lora_name']!r}, the saved LoRA is {expected_file!r}")
    model = loader["model"]
    if model is None or model_source is None or (model["node"], model["slot"]) != (model_source["node"],
                                                                                 model_source["slot"]):
        problems.append(f"the loader's model input comes from {model}, the training node's from {model_source}")
    if loader["type"] == "LoraLoader" and (loader["clip"] is None or loader["clip"]["outputType"] != "CLIP"):
        problems.append(f"the LoraLoader's clip input is not wired to a CLIP output: {loader['clip']}")
    return problems


def _cell_matches(cell: str, value) -> bool:
    if value is None:  # no value (an interval of one image): shown as "-", never as a number
        return cell == "-"
    if isinstance(value, bool):
        return cell == ("yes" if value else "no")
    if isinstance(value, str):
        return cell == value
    if isinstance(value, int):
        return cell == str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return cell.lower() in (str(value).lower(), "infinity", "-infinity", "nan")
        try:
            return abs(float(cell) - value) <= 5e-4 * max(1.0, abs(value))  # shown with 4 significant digits
        except ValueError:
            return False
    return cell == ("" if value is None else str(value))


def score_problems(shown: list[dict], expected: list[dict]) -> list[str]:
    """Each memora_scores table the server recorded is on the node: title, header, rows (first 12), values."""
    problems = []
    if len(shown) != len(expected):
        return [f"the node shows {len(shown)} tables, the server recorded {len(expected)}"]
    for page_table, t in zip(shown, expected):
        rows = page_table["rows"]
        if page_table["title"] != t["title"] or not rows or rows[0] != list(t["columns"]):
            problems.append(f"table {t['title']!r}: shown as {page_table['title']!r} with header "
                            f"{rows[0] if rows else None}, expected {t['columns']}")
            continue
        body = rows[1:]
        want = t["rows"][:MAX_TABLE_ROWS]
        if len(body) != len(want) + (1 if len(t["rows"]) > MAX_TABLE_ROWS else 0):
            problems.append(f"table {t['title']!r}: {len(body)} rows shown for {len(t['rows'])}")
            continue
        for got, row in zip(body, want):
            if len(got) != len(row) or not all(_cell_matches(c, v) for c, v in zip(got, row)):
                problems.append(f"table {t['title']!r}: row shown as {got}, recorded {row}")
    return problems


# -- collecting observations -------------------------------------------------------------------------------------------
def load_report(editor: Editor, server_url: str) -> dict:
    return {
        "listed": http_json(server_url + "/extensions"),
        "requests": list(editor.requests),
        "extensions": editor.js("() => __memoraTest.extensionNames()"),
        "console": list(editor.console),
        "errors": editor.errors(),
    }


PANEL_TOGGLE = 'button[aria-label="Toggle properties panel"]'  # front end >= 1.4x: missing models in the side panel
MISSING_SECTION_TEXT = """() => {
  // the smallest element around the "Missing Models" heading that also lists files (not the notes' text areas)
  const heads = [...document.querySelectorAll("body *")].filter((e) => e.children.length === 0 &&
    /^\\s*missing models\\s*$/i.test(e.textContent) && e.offsetParent !== null);
  for (const h of heads) {
    for (let e = h, up = 0; e && up < 8; e = e.parentElement, up++) {
      if (/\\.(ckpt|pt|safetensors)\\b/.test(e.innerText ?? "")) return e.innerText;
    }
  }
  return "";
}"""


def missing_models_panel(editor: Editor) -> str:
    """Front ends that list missing models in the properties side panel (1.49): its 'Missing Models' section."""
    toggle = editor.page.locator(PANEL_TOGGLE)
    if toggle.count() == 0:
        return ""
    toggle.first.click()
    try:
        editor.page.get_by_text("Errors", exact=True).first.click(timeout=5000)  # the panel's Errors tab
        editor.page.wait_for_function(f"() => ({MISSING_SECTION_TEXT})() !== ''", timeout=8000)
    except Exception:
        pass
    text = editor.js(MISSING_SECTION_TEXT)
    toggle.first.click()  # closed again: the canvas gets its width back
    editor.page.wait_for_timeout(300)
    return text


def close_missing_models(editor: Editor) -> str:
    """The missing models the editor lists for the open workflow: its missing-models dialog (front end 1.27; closed
    afterwards) or the properties panel's 'Missing Models' section (1.49); '' when it lists none."""
    dialog = editor.page.locator("[role=dialog]").filter(has_text=re.compile("missing models", re.I))
    try:
        dialog.first.wait_for(state="visible", timeout=8000)
    except Exception:
        return missing_models_panel(editor)
    text = dialog.first.inner_text()
    editor.page.keyboard.press("Escape")
    try:
        dialog.first.wait_for(state="hidden", timeout=3000)
    except Exception:
        dialog.first.locator("button[aria-label=Close], .p-dialog-close-button").first.click()
        dialog.first.wait_for(state="hidden", timeout=3000)
    return text


def open_recovery_workflow(editor: Editor, ckpt: str) -> dict:
    """Open the shipped memora_recovery workflow and shrink it to the tiny checkpoint; the alerts it raised and the
    missing-models dialog it opened (the template names models the test server does not have)."""
    editor.load(json.loads(WORKFLOW.read_text()))
    missing = close_missing_models(editor)
    alerts = editor.js("() => __memoraTest.toasts()")
    changed = editor.js("([ckpt, steps]) => __memoraTest.shrink(ckpt, steps)", [ckpt, TRAIN_STEPS])
    return {"alerts": alerts, "changed": changed, "missing_models": missing}


def run_recovery(editor: Editor, server_url: str) -> tuple[dict, dict]:
    """Queue the open workflow; what the page shows and what the server recorded."""
    finished = editor.queue_and_wait()
    assert finished["type"] == "execution_success", f"the workflow failed in the server: {finished}"
    history = http_json(f"{server_url}/history/{finished['prompt_id']}")[finished["prompt_id"]]
    outputs = history["outputs"]
    train = editor.nodes(TRAIN)[0]
    ui = outputs.get(train, {})
    expected = {"loss": ui.get("memora_loss", []), "lora": (ui.get("memora_lora") or [None])[-1],
                "scores": {nid: out["memora_scores"] for nid, out in outputs.items() if "memora_scores" in out},
                "images": {nid: out.get("images", []) for nid, out in outputs.items()}}
    panel = lambda node_id: editor.js("(id) => __memoraTest.panel(id)", node_id)  # noqa: E731
    editor.fit([train])  # the chart draws when it is on screen
    obs = {
        "train": train,
        "raw": editor.js("() => __memoraTest.raw"),
        "train_panel": panel(train),
        "progress": {t: [panel(i) for i in editor.nodes(t)] for t in ("MemoRaDDIMInversion", "MemoRaRegenerate")},
        "score_panels": {nid: panel(nid) for nid in expected["scores"]},
    }
    return obs, expected


def click_add_loader(editor: Editor, train: str) -> list[dict]:
    before = {ld["id"] for ld in editor.js("() => __memoraTest.loaders()")}
    editor.fit([train])
    try:
        editor.page.locator(f'.memora-panel[data-memora-node="{train}"] .memora-add-loader').click(timeout=10_000)
    except Exception as e:  # no button to click: loader_problems reports "created 0 LoraLoader nodes"
        print(f"[browser test] {editor.name}: no Add LoraLoader button to click ({type(e).__name__})")
        return []
    editor.page.wait_for_timeout(300)
    return [ld for ld in editor.js("() => __memoraTest.loaders()") if ld["id"] not in before]


# -- fixtures: the four pages ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stub(browser, browser_server):
    editor = Editor(browser, browser_server.url, transform=lambda js: "export {};\n", name="stub")
    try:
        return load_report(editor, browser_server.url)
    finally:
        editor.close()


@pytest.fixture(scope="module")
def broken(browser, browser_server, stub):
    editor = Editor(browser, browser_server.url, transform=lambda js: js + SYNTAX_ERROR, name="broken")
    try:
        return load_report(editor, browser_server.url)
    finally:
        editor.close()


@pytest.fixture(scope="module")
def session(browser, browser_server, tiny_ckpt_path, stub):
    """The real extension through a whole session; everything observed."""
    url = browser_server.url
    editor = Editor(browser, url, name="editor")
    out = {"load": load_report(editor, url)}
    try:
        # A graph without MemoRa nodes: run it, then look for any trace of the extension.
        editor.js("(ckpt) => __memoraTest.buildCoreGraph(ckpt)", tiny_ckpt_path.name)
        out["core_run"] = editor.queue_and_wait()
        out["core_traces"] = editor.js("() => __memoraTest.memoraTraces()")
        out["core_raw"] = editor.js("() => __memoraTest.raw")

        out["opened"] = open_recovery_workflow(editor, tiny_ckpt_path.name)
        out["obs"], out["expected"] = run_recovery(editor, url)
        train = out["obs"]["train"]
        out["lora_file"] = browser_server.base / "models" / "loras" / (out["expected"]["lora"] or "<none>")

        # Score tables and nudity previews, in view.
        score_nodes = list(out["expected"]["scores"])
        editor.fit(score_nodes)
        nudity = editor.nodes("MemoRaNudityScore")
        try:
            editor.page.wait_for_function(
                "(ids) => ids.every(id => { const p = __memoraTest.previews(id); return p.length && p.every(i => i.loaded); })",
                arg=nudity, timeout=15_000)
        except Exception:
            pass  # reported by the test below
        out["previews"] = {nid: editor.js("(id) => __memoraTest.previews(id)", nid) for nid in nudity}
        editor.screenshot("memora-scores.png")
        # The whole graph after the run, every table and preview in: the node boxes as the editor draws them.
        editor.page.wait_for_timeout(500)
        out["boxes"] = editor.js("() => __memoraTest.boxes()")
        editor.fit()
        editor.screenshot("memora-layout.png")

        # Descriptions and tooltips: as the editor received them, and as it shows them on hover.
        out["defs"] = editor.js("() => __memoraTest.memoraNodeDefs()")
        hovers = {}
        for node_type, input_name in ((TRAIN, "latents"), ("MemoRaDDIMInversion", "model"),
                                      ("MemoRaNudityScore", "images")):
            node_id = editor.nodes(node_type)[0]
            editor.fit([node_id])
            targets = editor.js("([id, name]) => __memoraTest.hoverTargets(id, name)", [node_id, input_name])
            hovers[node_type] = {"title": editor.hover_tooltip(targets["title"]), "input_name": input_name,
                                 "input": editor.hover_tooltip(targets["input"])}
            editor.page.mouse.move(5, 500)
        out["hovers"] = hovers

        out["model_source"] = editor.js("(id) => __memoraTest.inputSource(id, 'model')", train)
        out["new_loaders"] = click_add_loader(editor, train)
        editor.fit([train, *[ld["id"] for ld in out["new_loaders"]]])
        editor.screenshot("memora-train.png")

        # Save, then reopen the workflow the way the editor opens a file.
        saved = editor.js("() => __memoraTest.serialize()")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "memora-recovery-saved.json").write_text(json.dumps(saved, indent=1))
        out["saved"] = saved
        editor.js("() => (app.rootGraph ?? app.graph).clear()")
        editor.load(saved)
        editor.fit([train])
        out["reopened_panel"] = editor.js("(id) => __memoraTest.panel(id)", train)
        out["reopened_loaders"] = editor.js("() => __memoraTest.loaders()")
        out["console_end"] = list(editor.console)
        return out
    finally:
        editor.close()


@pytest.fixture(scope="module")
def sabotaged(browser, browser_server, session):
    def sabotage(js: str) -> str:
        for old, new in SABOTAGE:
            assert js.count(old) == 1, f"sabotage target not found once in memora.js: {old}"
            js = js.replace(old, new)
        return js

    url = browser_server.url
    editor = Editor(browser, url, transform=sabotage, name="sabotaged")
    try:
        editor.load(session["saved"])
        train = editor.nodes(TRAIN)[0]
        out = {"model_source": editor.js("(id) => __memoraTest.inputSource(id, 'model')", train),
               "new_loaders": click_add_loader(editor, train)}
        editor.js("(id) => __memoraTest.setWidget(id, 'seed', 4242)", train)  # not a cached re-run
        out["obs"], out["expected"] = run_recovery(editor, url)
        return out
    finally:
        editor.close()


# -- tests -------------------------------------------------------------------------------------------------------------
def test_broken_extension_is_detected(broken, stub):
    """Negative check for loading: a syntax error in web/ fails the load check the real extension passes."""
    problems = load_problems(broken, baseline=stub["errors"])
    assert any("registered 0 times" in p for p in problems), problems
    # The front end reports the syntax error (1.27: 'Error loading extension .../memora.js'; 1.49: a vite preload
    # error without the URL): either way an error the stub page does not show.
    assert any("console error" in p for p in problems), problems


def test_extension_served_once_registered_once_without_console_errors(session, stub):
    assert load_problems(session["load"], baseline=stub["errors"]) == []
    late = {**session["load"], "console": session["console_end"]}  # also after a whole session
    assert load_problems(late, baseline=stub["errors"]) == []


def test_graph_without_memora_nodes_is_left_alone(session):
    assert session["core_run"]["type"] == "execution_success", session["core_run"]
    assert session["core_traces"] == {"panels": 0, "styles": 0, "properties": [], "widgets": [], "patched": []}
    assert session["core_raw"] == {}


def overlaps(boxes: list[dict]) -> list[str]:
    """Pairs of node boxes (title bar included) that share any area."""
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] \
                    and b["y"] < a["y"] + a["h"]:
                out.append(f"{a['title']} [{a['x']:.0f},{a['y']:.0f} {a['w']:.0f}x{a['h']:.0f}] / "
                           f"{b['title']} [{b['x']:.0f},{b['y']:.0f} {b['w']:.0f}x{b['h']:.0f}]")
    return out


def test_overlap_check_sees_overlapping_boxes():
    """Negative check for the layout test: two boxes sharing a corner are reported, two side by side are not."""
    a = {"title": "a", "x": 0, "y": 0, "w": 100, "h": 100}
    assert overlaps([a, {**a, "title": "b", "x": 90, "y": 90}]) and not overlaps([a, {**a, "title": "c", "x": 100}])


def test_no_two_nodes_overlap_after_a_run(session):
    """After a run the score tables and the nudity previews are in their nodes (the nodes grew to hold them); the
    template is laid out for that size: no node covers another (screenshot: test-artifacts/browser/memora-layout.png)."""
    boxes = session["boxes"]
    assert len(boxes) == len(json.loads(WORKFLOW.read_text())["nodes"]), len(boxes)
    grown = {b["title"]: b["h"] for b in boxes if b["type"] in ("MemoRaNudityScore", "MemoRaSimilarityScore")}
    print(f"[browser test] score node heights after the run (title bar included): {grown}")
    assert overlaps(boxes) == []


def test_the_editor_offers_the_models_the_template_names(session):
    """memora_recovery names SD 1.4 and a public unlearned model (properties.models and the workflow's models list,
    docs/models.md): opened where neither file is, the editor lists both as missing models (front end 1.27: the
    missing-models dialog, with both links; 1.49: the properties panel's Errors tab, with SD 1.4's download; it
    matches download links to a widget's exact value, and the unlearned loader's value carries its folder)."""
    shown = session["opened"]["missing_models"]
    wf = json.loads(WORKFLOW.read_text())
    names = {m["name"] for m in wf.get("models", [])}
    assert names == {"sd-v1-4.ckpt", "UCE-Nudity-Diffusers-UNet.pt"}, names
    for name in names:
        assert name in shown, f"the missing-models dialog does not list {name}: {shown!r}"


def test_shipped_workflow_opens_without_alerts(session):
    assert session["opened"]["alerts"] == [], f"opening memora_recovery.json raised: {session['opened']['alerts']}"
    assert any(c.startswith(f"{TRAIN}#") for c in session["opened"]["changed"]), session["opened"]["changed"]


def test_training_shows_live_chart_final_loss_and_saved_lora(session):
    expected = session["expected"]
    assert expected["lora"], "the training node reported no saved LoRA (memora_lora UI output)"
    assert session["lora_file"].is_file(), f"{session['lora_file']} does not exist"
    assert len(expected["loss"]) == TRAIN_STEPS
    assert training_problems(session["obs"], expected) == []
    print(f"\nchart: {session['obs']['train_panel']['stats']} | LoRA {expected['lora']}")


def test_inversion_and_regeneration_show_progress(session):
    for node_type, panels in session["obs"]["progress"].items():
        assert panels, f"no {node_type} node in the workflow"
        stage = "inversion" if "Inversion" in node_type else "regeneration"
        for panel in panels:
            assert panel is not None and panel["progress"], f"{node_type} shows no progress: {panel}"
            assert re.match(rf"{stage}: (\d+)/\1 in ", panel["progress"]), panel["progress"]
    assert session["obs"]["raw"].get("memora.progress", 0) > 0


def test_score_nodes_show_their_numbers_as_tables(session):
    scores = session["expected"]["scores"]
    types = {n["type"] for n in session["saved"]["nodes"] if str(n["id"]) in scores}
    assert {"MemoRaNudityScore", "MemoRaSimilarityScore"} <= types, types
    for node_id, tables in scores.items():
        panel = session["obs"]["score_panels"][node_id]
        assert panel is not None, f"score node {node_id} has no MemoRa panel"
        assert score_problems(panel["tables"], tables) == [], node_id


def test_nudity_previews_are_shown_on_the_node(session):
    assert session["previews"], "no MemoRa Nudity Score node in the workflow"
    for node_id, previews in session["previews"].items():
        files = session["expected"]["images"].get(node_id) or []
        assert files, f"nudity node {node_id} returned no preview images as UI output"
        assert len(previews) == len(files) and all(p["loaded"] for p in previews), (node_id, previews)
        for p, f in zip(previews, files):
            assert f"filename={f['filename']}" in p["src"], (p["src"], f)


def test_add_loader_creates_a_lora_loader_wired_to_the_saved_file(session):
    assert loader_problems(session["new_loaders"], session["expected"]["lora"], session["model_source"]) == []


def test_reopened_workflow_restores_chart_and_lora(session):
    panel = session["reopened_panel"]
    expected = session["expected"]
    assert panel is not None, "the reopened training node has no panel"
    assert panel["points"] == len(expected["loss"])
    assert float(panel["finalLoss"]) == pytest.approx(expected["loss"][-1]["loss"], rel=1e-9)
    assert panel["loraName"] == expected["lora"]
    assert panel["chartPixels"] >= 50
    assert [ld["lora_name"] for ld in session["reopened_loaders"]] == [expected["lora"]]
    train = next(n for n in session["saved"]["nodes"] if n["type"] == TRAIN)
    assert len(train["properties"]["memora_loss"]) == len(expected["loss"])
    # The panel is not a widget value: the saved widgets_values hold as many values as the shipped workflow's.
    shipped = next(n for n in json.loads(WORKFLOW.read_text())["nodes"] if n["type"] == TRAIN)
    assert len(train["widgets_values"]) == len(shipped["widgets_values"])


def test_every_memora_node_has_a_description_and_tooltips_shown_on_hover(session):
    # The pack's nodes (the test kit's MemoRaTest_* helpers come from another module).
    defs = {t: d for t, d in session["defs"].items() if "comfyui-memora" in (d["module"] or "")}
    assert {TRAIN, "MemoRaDDIMInversion", "MemoRaNudityScore"} <= set(defs), sorted(session["defs"])
    for node_type, d in defs.items():
        assert d["description"], f"{node_type} has no description"
        missing = [name for name, tip in d["inputs"].items() if not tip]
        assert not missing, f"{node_type} inputs without tooltip: {missing}"
    for node_type, h in session["hovers"].items():
        assert h["title"] == defs[node_type]["description"].strip(), (node_type, h["title"])
        assert h["input"] == defs[node_type]["inputs"][h["input_name"]].strip(), (node_type, h["input"])


def test_sabotaged_extension_fails_the_same_checks(sabotaged, session):
    """Negative check for events and wiring: a copy of memora.js whose chart ignores memora.train and whose loader
    loads another file fails training_problems and loader_problems, which the real extension passes above."""
    problems = training_problems(sabotaged["obs"], sabotaged["expected"])
    assert any("live points" in p for p in problems), problems
    problems = loader_problems(sabotaged["new_loaders"], session["expected"]["lora"], sabotaged["model_source"])
    assert any(WRONG_FILE in p for p in problems), problems
