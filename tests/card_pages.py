"""Cards as Anki renders them, laid out by headless Chromium at phone width, and checked by a script in the page.

Anki renders each card (the official ``anki`` package: ``card.question()`` / ``card.answer()``, CSS included);
each side goes into its own 360 px wide iframe, in day and night mode, with the analysis unfolded. A script in the
page then measures every element and every Hangul word and writes its verdict into the DOM, which Chromium's
``--dump-dom`` returns: nothing wider than the viewport, and no Hangul word on two lines.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--font-render-hinting=none")
WIDTH = 360


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass(frozen=True)
class Side:
    """One rendered side of one card: what Anki's ``question()`` or ``answer()`` returned."""

    label: str
    html: str


def card_document(side: Side, *, night: bool, unfold: bool = True) -> str:
    """A side as Anki's reviewer shows it: body.card (and nightMode), viewport at device width."""
    body = side.html
    if unfold:
        body = body.replace("<details", "<details open")
    night_html, night_body = (' class="night_mode"', " nightMode") if night else ("", "")
    return (f'<!doctype html><html{night_html}><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1"></head>'
            f'<body class="card{night_body}">{body}</body></html>')


_CHECK = r"""
<script>
function check(doc, label) {
  const problems = [];
  const win = doc.defaultView, width = win.innerWidth;
  const pageWidth = doc.documentElement.scrollWidth;
  if (pageWidth > width + 1) problems.push(label + ": page is " + pageWidth + " px wide");
  for (const el of doc.body.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && (r.right > width + 1 || r.left < -1)) {
      const name = "<" + el.tagName.toLowerCase() + " class=" + el.className + ">";
      problems.push(label + ": " + name + " spans " + Math.round(r.left) + ".." + Math.round(r.right) + " px");
    }
  }
  const walker = doc.createTreeWalker(doc.body, NodeFilter.SHOW_TEXT);
  let words = 0;
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.nodeValue, re = /\S*[\uac00-\ud7a3]\S*/g;
    if (/[\u4e00-\u9fff]/.test(text) && node.parentElement.closest("script, style") === null) {
      const tagged = node.parentElement.closest("[lang]");
      if (!tagged || !tagged.lang.startsWith("ko")) {
        problems.push(label + ": Hanja " + text.trim() + " without lang=ko");
      }
    }
    let m;
    while ((m = re.exec(text)) !== null) {
      const range = doc.createRange();
      range.setStart(node, m.index); range.setEnd(node, m.index + m[0].length);
      const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
      words++;
      if (tops.size > 1) problems.push(label + ": Hangul word " + m[0] + " spans " + tops.size + " lines");
    }
  }
  return {problems, words};
}
window.addEventListener("load", () => {
  const verdict = {checked: 0, words: 0, problems: []};
  for (const frame of document.querySelectorAll("iframe")) {
    const result = check(frame.contentDocument, frame.dataset.label);
    verdict.checked++; verdict.words += result.words; verdict.problems.push(...result.problems);
  }
  const out = document.createElement("pre");
  out.id = "verdict"; out.textContent = JSON.stringify(verdict);
  document.body.appendChild(out);
});
</script>
"""


def check_page(sides: list[Side]) -> str:
    frames = []
    for side in sides:
        for night in (False, True):
            label = f"{side.label} ({'night' if night else 'day'})"
            frames.append(f'<iframe data-label="{html.escape(label)}" width="{WIDTH}" height="2400" '
                          f'scrolling="no" style="border:0;display:block" '
                          f'srcdoc="{html.escape(card_document(side, night=night))}"></iframe>')
    return f'<!doctype html><html><head><meta charset="utf-8"></head><body>{"".join(frames)}{_CHECK}</body></html>'


@dataclass(frozen=True)
class Verdict:
    checked: int
    words: int
    problems: list[str]


def _run(args: list[str], page: Path, timeout: float = 120.0) -> str:
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed")
    with tempfile.TemporaryDirectory(prefix="fp-chromium-") as profile:
        proc = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                              capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def check_in_chromium(sides: list[Side], folder: Path) -> Verdict:
    """Lay out every side at 360 px, day and night, in one Chromium run; the page's own verdict."""
    page = folder / "check.html"
    page.write_text(check_page(sides), encoding="utf-8")
    dom = _run(["--dump-dom", "--virtual-time-budget=20000"], page)
    found = re.search(r'<pre id="verdict">(.*?)</pre>', dom, re.DOTALL)
    if found is None:
        raise RuntimeError("the page wrote no verdict (its script did not run)")
    data = json.loads(html.unescape(found.group(1)))
    return Verdict(checked=data["checked"], words=data["words"], problems=data["problems"])


def screenshot(side: Side, path: Path, *, night: bool, height: int = 900, unfold: bool = False) -> None:
    """A PNG of one side at 360 px, as a phone shows it."""
    page = path.with_suffix(".html")
    page.write_text(card_document(side, night=night, unfold=unfold), encoding="utf-8")
    _run([f"--screenshot={path}", f"--window-size={WIDTH},{height}"], page)
    page.unlink()
