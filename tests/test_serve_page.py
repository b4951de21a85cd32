"""The web page in a real headless Chromium (Debian's, driven by Playwright): token, compose,
submit, clips appearing while the video is made, the final video playing, extend, cancel.
Screenshots go to $CLIPLOOM_SCREENSHOTS (``make screenshots``: docs/img/serve_*.png), else to
the test's temporary folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "") if p and os.path.exists(p)), None)

pytest.importorskip("pytest_playwright", reason="pytest-playwright is not installed (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: `apt-get install chromium` (make test does this as root)")


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "headless": True}


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    from test_serve import ThreadServer

    data = tmp_path_factory.mktemp("page")
    srv = ThreadServer(data, token="page-token")
    srv.data_dir = data
    yield srv
    srv.close()


def _open(page, server) -> None:
    """Open the page; the server wants a token: the page asks once and keeps it for this tab."""
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(server.url + "/")
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-input", "page-token")
    page.click("#token-save")
    page.wait_for_selector("#model option", state="attached")


def test_compose_submit_watch_play_extend_and_cancel(page_server, page, tmp_path):
    shots = Path(os.environ.get("CLIPLOOM_SCREENSHOTS") or tmp_path)
    _open(page, page_server)
    assert page.locator("#model").input_value() == "builtin"

    # Compose: two clip prompts (the second held for two clips), a rendered reference, 4 steps.
    page.fill("#clips li:nth-child(1) .prompt", "a big yellow square moves left on a navy background")
    page.click("#add-clip")
    page.fill("#clips li:nth-child(2) .prompt", "a big yellow square moves up on a navy background")
    page.fill("#clips li:nth-child(2) .repeat", "2")
    page.click("#add-clip")
    page.fill("#clips li:nth-child(3) .prompt", "removed again")
    page.click("#clips li:nth-child(3) .remove")
    assert page.locator("#clips li").count() == 2
    page.click("#render-reference")
    page.wait_for_selector("#reference-preview:not([hidden])")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "serve_compose.png"))
    page.click("#submit")

    # Clips appear as they finish, then the whole video plays.
    page.wait_for_selector("#clip-grid video", timeout=60_000)
    page.wait_for_selector("#final-box:not([hidden])", timeout=120_000)
    page.wait_for_function("document.querySelector('#final').readyState >= 1", timeout=30_000)
    state = page.evaluate("""() => { const v = document.querySelector('#final');
        return {ready: v.readyState, duration: v.duration, clips: document.querySelectorAll('#clip-grid video').length}; }""")
    assert state["clips"] == 3 and state["ready"] >= 1
    assert abs(state["duration"] - (17 + 2 * 12) / 16) < 0.1  # 3 clips of the built-in model at 16 fps
    page.wait_for_selector("#eval-box:not([hidden])", timeout=30_000)
    page.wait_for_function("document.querySelector('#eval-contact').naturalWidth > 0")
    page.screenshot(path=str(shots / "serve_video.png"), full_page=True)
    first = page.locator("#jobs tbody tr").first.get_attribute("data-id")

    # Extend the finished video with one more clip.
    page.fill("#extend-prompts", "a big yellow square moves right on a navy background")
    page.click("#extend-form button[type=submit]")
    page.wait_for_function(f"document.querySelectorAll('#jobs tbody tr').length == 2 && "
                           f"document.querySelector('#jobs tbody tr').dataset.id != '{first}'")
    page.wait_for_selector("#final-box:not([hidden])", timeout=120_000)
    page.wait_for_function("document.querySelector('#final').readyState >= 1")
    duration = page.evaluate("document.querySelector('#final').duration")
    assert abs(duration - (17 + 3 * 12) / 16) < 0.1

    # A long video, cancelled from the list while it runs: it disappears and the worker is free.
    page.fill("#clips li:nth-child(2) .repeat", "40")
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('#jobs tbody tr').length == 3")
    page.wait_for_selector("#jobs tbody tr:first-child .status.in_progress", timeout=30_000)
    page.screenshot(path=str(shots / "serve_running.png"), full_page=True)
    page.click("#jobs tbody tr:first-child button.danger")
    page.wait_for_function("document.querySelectorAll('#jobs tbody tr').length == 2", timeout=30_000)
    assert page_server.state.workers[0].cancelled_at is not None


def test_a_clip_row_can_end_on_an_uploaded_image(page_server, page, tmp_path):
    """Each clip row takes an end frame (end-frame control, issue 15): it ends the row's last clip,
    sent as ``end_frame[N]`` with N the clip number the report uses."""
    import json

    from PIL import Image

    shots = Path(os.environ.get("CLIPLOOM_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    end = tmp_path / "end.png"
    Image.new("RGB", (32, 32), (250, 200, 20)).save(end)
    _open(page, page_server)
    page.fill("#clips li:nth-child(1) .prompt", "a big yellow square moves left on a navy background")
    page.fill("#clips li:nth-child(1) .repeat", "2")
    page.set_input_files("#clips li:nth-child(1) .end-file", str(end))
    page.wait_for_selector("#clips li:nth-child(1) .end-thumb:not([hidden])")
    page.click("#add-clip")
    page.fill("#clips li:nth-child(2) .prompt", "a big yellow square moves up on a navy background")
    page.click("#render-reference")
    page.wait_for_selector("#reference-preview:not([hidden])")
    page.fill("#steps", "1")
    page.screenshot(path=str(shots / "serve_end_frame.png"))
    before = set(page_server.data_dir.rglob("story.json"))
    page.click("#submit")
    page.wait_for_function("document.querySelector('#jobs tbody tr')")
    page.wait_for_function("document.querySelector('#compose-error').textContent === '' && !document.querySelector('#submit').disabled")
    new = [p for p in page_server.data_dir.rglob("story.json") if p not in before]
    assert len(new) == 1
    clips = json.loads(new[0].read_text())["clips"]
    assert [c.get("end_frame") for c in clips] == [None, "end_000001.png", None]  # row 1's last clip is clip 1
    assert (new[0].parent / "end_000001.png").is_file()
