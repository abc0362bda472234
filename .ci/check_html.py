"""Check the built HTML book as a reader's browser sees it, offline.

    python .ci/check_html.py _build/html [--screenshots _build/screenshots]

For every page: every local link, image and script resolves (anchors included); the launch,
repository and issue buttons point at _config.yml's repository; in headless Chromium (Debian's
`chromium`, driven by Playwright) the page loads with no console error and no request leaving
the machine, every image is loaded, all math is rendered by the site's own MathJax, and no
jupyter-widget view (dead without a kernel) is on the page, no code block is wider than the page, each widget cell of the notebook being
tagged remove-output and followed by its static twin. A full-page screenshot of every page is
written to the screenshots folder. Known failures of the current chapters are listed in
.ci/known_failures.yml; a listed page that passes is an error too.
"""
import argparse
import functools
import http.server
import shutil
import sys
import threading
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import notebooks  # noqa: E402

ROOT = notebooks.ROOT
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian: apt-get install chromium
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--dns-prefetch-disable"]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
CHECKS = ("links", "buttons", "console", "offline", "figures", "math", "widgets", "code")


class Page(HTMLParser):
    """The ids and the local references (href/src) of one HTML file."""

    def __init__(self, text):
        super().__init__()
        self.ids, self.refs, self.anchors = set(), [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key) and (key == "id" or tag == "a"):
                self.ids.add(attrs[key])
        for key in ("href", "src"):
            if attrs.get(key) is not None:
                self.refs.append(attrs[key])
        if tag == "a" and attrs.get("href"):
            self.anchors.append(attrs["href"])


def broken_links(site: Path, pages: dict) -> dict:
    """page → local references that do not resolve (missing file or missing anchor)."""
    broken = defaultdict(list)
    for path, page in pages.items():
        for ref in page.refs:
            parts = urlparse(ref)
            if parts.scheme or ref.startswith("//") or not ref:
                continue  # external (checked nowhere: offline), mailto:, data:, javascript:
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file() or site.resolve() not in target.parents:
                broken[path].append(f"{ref} (no file)")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else Page(target.read_text()).ids
                if unquote(parts.fragment) not in ids:
                    broken[path].append(f"{ref} (no anchor)")
    return broken


def wrong_buttons(page: Page, notebook: Path | None) -> list:
    """The repository, issue, Colab and Binder buttons, checked against _config.yml."""
    url = notebooks.repository()[0]
    links = page.anchors
    problems = []
    if url not in links:
        problems.append(f"no repository button to {url}")
    if not any(a.startswith(f"{url}/issues/new") for a in links):
        problems.append("no issue button")
    if notebook is not None:
        for name, expected in [("Colab", notebooks.colab_url(notebook)),
                               ("Binder", notebooks.binder_url(notebook))]:
            host = urlparse(expected).netloc
            found = [a for a in links if urlparse(a).netloc == host]
            if found != [expected]:
                problems.append(f"{name} button {found} is not [{expected}]")
    return problems


def widget_cells_without_twin(notebook: Path) -> list:
    """Cells with a widget view that are not tagged remove-output/remove-cell and followed by
    a code cell with a figure (the static twin)."""
    cells = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    problems = []
    for i, cell in enumerate(cells):
        if not any(WIDGET_VIEW in o.get("data", {}) for o in cell.outputs):
            continue
        tags = set(cell.metadata.get("tags", []))
        twin = cells[i + 1] if i + 1 < len(cells) else None
        has_figure = twin is not None and any("image/png" in o.get("data", {}) or
                                              "image/svg+xml" in o.get("data", {})
                                              for o in twin.outputs)
        if not tags & {"remove-output", "remove-cell"}:
            problems.append(f"code cell {i} shows a widget: tag it remove-output")
        elif not has_figure:
            problems.append(f"code cell {i} (widget) is not followed by a figure (its static twin)")
    return problems


BROWSER_CHECK = """async () => {
    const math = [...document.querySelectorAll('span.math, div.math')];
    if (math.length && window.MathJax && MathJax.startup) { await MathJax.startup.promise; }
    const images = [...document.querySelectorAll('img')];
    await Promise.all(images.map(img => img.complete ? null :
        new Promise(done => { img.onload = img.onerror = done; })));
    return {
        math: math.length,
        unrendered: math.filter(m => !m.querySelector('mjx-container')).length,
        tex_errors: document.querySelectorAll('mjx-merror').length,
        mathjax_src: [...document.scripts].map(s => s.src).filter(s => /mathjax/i.test(s)),
        broken_images: images.filter(img => !(img.naturalWidth > 0)).map(img => img.src),
        images: images.length,
        hidden_code: [...document.querySelectorAll('div.highlight pre')]
            .filter(p => p.scrollWidth > p.clientWidth + 1).map(p => p.textContent.slice(0, 60)),
        widget_views: document.querySelectorAll(
            'script[type="application/vnd.jupyter.widget-view+json"]').length,
    };
}"""


def browse(site: Path, pages: list, screenshots: Path) -> dict:
    """page → {check: [problems]} from headless Chromium; screenshots written on the way."""
    from playwright.sync_api import sync_playwright

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/"
    screenshots.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for path in pages:
                rel = path.relative_to(site).as_posix()
                problems = defaultdict(list)
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                context.route("**/*", lambda route: route.continue_()
                              if route.request.url.startswith(base) else
                              (problems["offline"].append(route.request.url), route.abort()))
                page = context.new_page()
                page.on("console", lambda m: problems["console"].append(m.text)
                        if m.type == "error" else None)
                page.on("pageerror", lambda e: problems["console"].append(f"uncaught: {e}"))
                page.goto(base + rel, wait_until="load", timeout=60_000)
                page.wait_for_load_state("networkidle", timeout=60_000)
                state = page.evaluate(BROWSER_CHECK)
                if state["math"] and (state["unrendered"] or state["tex_errors"]):
                    problems["math"].append(f"{state['unrendered']} of {state['math']} formulas "
                                            f"unrendered, {state['tex_errors']} TeX errors")
                if state["math"] and not all(s.startswith(base) for s in state["mathjax_src"]):
                    problems["math"].append(f"MathJax not served by the site: {state['mathjax_src']}")
                if state["broken_images"]:
                    problems["figures"] += [f"not loaded: {s}" for s in state["broken_images"]]
                if state["hidden_code"]:
                    problems["code"] += [f"code wider than the page: {t!r}…" for t in state["hidden_code"]]
                if state["widget_views"]:
                    problems["widgets"].append(f"{state['widget_views']} widget view(s) on the page "
                                               "(dead without a kernel)")
                name = rel.removesuffix(".html").replace("/", "__")
                page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)
                context.close()
                results[path] = dict(problems) | {"_info": state}
            browser.close()
    finally:
        server.shutdown()
    return results


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def check(site: Path, screenshots: Path) -> dict:
    """page (relative, without .html) → {check: [problems]} for every page of the built site."""
    site = site.resolve()
    files = sorted(p for p in site.rglob("*.html")
                   if not p.relative_to(site).parts[0].startswith("_"))
    parsed = {p: Page(p.read_text()) for p in files}
    links = broken_links(site, parsed)
    chapters = {Path(c).with_suffix("").relative_to(ROOT).as_posix(): c
                for c in notebooks.chapters()}
    redirects = [p for p in files if 'http-equiv="refresh"' in p.read_text()[:2000].lower()]
    for old in screenshots.glob("*.png"):
        old.unlink()
    results = browse(site, [p for p in files if p not in redirects], screenshots)
    report = {}
    for path in files:
        rel = path.relative_to(site).with_suffix("").as_posix()
        problems = dict(results.get(path, {}))
        if links.get(path):
            problems["links"] = links[path]
        if path not in redirects and rel.startswith("book/"):
            if wrong := wrong_buttons(parsed[path], chapters.get(rel)):
                problems["buttons"] = wrong
        if rel in chapters and (twin := widget_cells_without_twin(chapters[rel])):
            problems.setdefault("widgets", []).extend(twin)
        problems.setdefault("_info", {"redirect": path in redirects, "links": len(parsed[path].refs)})
        report[rel] = problems
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--screenshots", type=Path, default=ROOT / "_build" / "screenshots")
    args = parser.parse_args()
    known = yaml.safe_load((ROOT / ".ci" / "known_failures.yml").read_text()) or {}
    if not any(args.site.glob("**/*.html")):
        print(f"no HTML pages under {args.site}: build the book first (make book)")
        return 1
    report = check(args.site, args.screenshots)
    counts = {"ok": 0, "known": 0, "failed": 0}
    for rel, problems in report.items():
        info = problems.pop("_info")
        print(f"{rel}: " + ("redirect" if info.get("redirect") else
                            f"{info.get('images', 0)} images, {info.get('math', 0)} formulas"))
        for name in CHECKS:
            listed = rel.startswith("book/") and Path(rel).name in known.get(name, [])
            found = problems.get(name, [])
            if found and listed:
                status, key = "known failure (.ci/known_failures.yml)", "known"
            elif found:
                status, key = "FAIL", "failed"
            elif listed:
                status, key = "passes: remove it from .ci/known_failures.yml", "failed"
            else:
                counts["ok"] += 1
                continue
            counts[key] += 1
            more = f" (+{len(found) - 5} more)" if len(found) > 5 else ""
            print(f"  {name:8} {status}: " + "; ".join(found[:5]) + more)
    print(f"\n{len(report)} pages x {len(CHECKS)} checks ({', '.join(CHECKS)}): {counts['ok']} ok, "
          f"{counts['known']} known failures, {counts['failed']} failed. "
          f"Screenshots: {args.screenshots}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
