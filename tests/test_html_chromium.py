"""The HTML leaderboard in a real headless browser (Debian's chromium): the table renders and every plot loads.

String checks on the page cannot see a broken <img> path or markup a browser rejects; a browser can.
"""

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from test_reporters import _rows

from bench import plugins
from bench.leaderboard import build

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed (/usr/bin/chromium): apt-get install -y chromium",
)
FLAGS = [
    "--headless",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# Runs on the page's load event (after every image finished or failed): records what the browser decoded.
PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) img.setAttribute("data-natural-width", img.naturalWidth);
  document.body.setAttribute("data-loaded", "yes");
});
</script>"""


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of each <td>."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.cells: list[tuple[dict, str]] = []
        self._cell: dict | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "td":
            self._cell, self._text = dict(attrs), ""

    def handle_data(self, data):
        if self._cell is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append((self._cell, self._text.strip()))
            self._cell = None

    def find(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=90
    )


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    board = build(_rows(), [], ["runs/a"])
    plugins.load().reporters.get("html")(board, out / "leaderboard.html")
    return board, out / "leaderboard.html"


def test_table_and_plots_render_in_chromium(page, tmp_path):
    board, path = page
    probe = path.with_name("probe.html")  # same folder: the page's relative image paths still resolve
    probe.write_text(path.read_text().replace("</body>", PROBE + "</body>"))
    done = _chromium(tmp_path, "--dump-dom", probe.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Elements()
    dom.feed(done.stdout)
    assert dom.find("body")[0].get("data-loaded") == "yes", "the load event never ran"
    assert [t["class"] for t in dom.find("table")] == ["leaderboard"]
    assert len(dom.find("tr")) >= 2 + len(board.table.index)  # header rows + one per method
    texts = [text for _, text in dom.cells]
    assert "84.50 ± 0.71" in texts and "rtn[clip_mse&50%]" in done.stdout.replace("&amp;", "&")
    best = [text for attrs, text in dom.cells if "best" in attrs.get("class", "").split()]
    assert sorted(best) == sorted(board.table.at[i, c] for c, i in board.best().items())
    images = dom.find("img")
    assert sorted(img["src"] for img in images) == [
        "leaderboard-bits.png",
        "leaderboard-pareto.png",
        "leaderboard-sharpness.png",
    ]
    for img in images:
        assert int(img["data-natural-width"]) > 400, f"{img['src']} did not load"
    assert "quantbench</dt>" in done.stdout and "m (package:x)" in done.stdout  # provenance footer


def test_page_screenshot_is_not_blank(page, tmp_path):
    _, path = page
    shot = tmp_path / "shot.png"
    done = _chromium(tmp_path, "--window-size=1400,1800", f"--screenshot={shot}", path.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1400, 1800)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 50  # text, table shading and plot lines, not an empty page
