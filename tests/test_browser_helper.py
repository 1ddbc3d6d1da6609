"""The headless-browser helper reports what a visitor sees: loaded and broken images, text, console errors."""

from __future__ import annotations

from pathlib import Path

import browser
import pytest
from PIL import Image


def _leftover_chromium() -> list[str]:
    # Live processes still using one of the helper's profiles (zombies waiting for init to reap them do not count).
    left = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "fastimagic-chromium-" in cmdline and state != "Z":
            left.append(f"{proc.name}: {cmdline[:80]}")
    return left


def _write_page(folder: Path, body: str) -> Path:
    (folder / "scenes" / "walk").mkdir(parents=True)
    Image.new("RGB", (12, 8), (200, 30, 30)).save(folder / "scenes" / "walk" / "0-g1.10-none.png")
    page = folder / "index.html"
    page.write_text(f"<!doctype html><html><head><title>run</title></head><body>{body}</body></html>")
    return page


def test_reports_loaded_and_broken_images_text_and_console_errors(tmp_path):
    page = _write_page(
        tmp_path,
        "<h1>Keyframes of walk</h1>"
        '<img src="scenes/walk/0-g1.10-none.png" alt="good">'
        '<img src="scenes/walk/missing.png" alt="broken">'
        '<p style="display:none">not visible</p>'
        '<script>console.log("fine"); console.error("bad thing", 7);</script>',
    )
    result = browser.check_page(page)
    images = {im["src"]: im for im in result["images"]}
    assert list(images) == ["scenes/walk/0-g1.10-none.png", "scenes/walk/missing.png"]
    good, broken = images["scenes/walk/0-g1.10-none.png"], images["scenes/walk/missing.png"]
    assert good["complete"] and good["naturalWidth"] == 12
    assert broken["naturalWidth"] == 0  # a failed image is "complete" too, with no pixels
    assert result["text"] == "Keyframes of walk"
    assert [(e["source"], e["text"]) for e in result["console_errors"]] == [("console", "bad thing 7")]
    assert [e["url"].rsplit("/", 1)[1] for e in result["network_errors"]] == ["missing.png"]
    assert _leftover_chromium() == []


def test_uncaught_exceptions_count_as_console_errors(tmp_path):
    page = _write_page(tmp_path, '<p>ok</p><script>throw new Error("kaput")</script>')
    result = browser.check_page(page)
    assert [e["source"] for e in result["console_errors"]] == ["exception"]
    assert "kaput" in result["console_errors"][0]["text"]
    assert result["network_errors"] == []


def test_chromium_is_stopped_when_the_check_fails(tmp_path, monkeypatch):
    browser.require_chromium()
    page = _write_page(tmp_path, "<p>ok</p>")
    monkeypatch.setattr(browser, "_STATE_JS", "(() => { throw new Error('no DOM for you') })()")
    with pytest.raises(browser.BrowserError, match="reading the DOM failed"):
        browser.check_page(page)
    assert _leftover_chromium() == []
