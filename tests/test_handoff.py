"""The hand-off to a video stage and the run's visibility: sequence.json through the real flow, `fastimagic runs`,
and the one progress display of `fastimagic run` in a terminal, in a pipe, verbose and quiet."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from test_cli import ROOT, _board, fastimagic
from test_faults import _spawn, _story, _wait_for

from fastimagic import keyframes as kf
from fastimagic.progress import ProgressDisplay

SCHEMA = json.loads((ROOT / "docs" / "sequence.schema.json").read_text())


def _sequence(run_dir: Path) -> dict:
    sequence = json.loads((run_dir / "sequence.json").read_text())
    jsonschema.validate(sequence, SCHEMA)
    return sequence


# --- the sequence, through the flow ----------------------------------------------------------------------------


def test_a_run_with_select_and_auto_writes_a_valid_sequence_of_its_picks(tmp_path, photo_bytes):
    from flows.storyboard import storyboard_flow

    (tmp_path / "ref.jpg").write_bytes(photo_bytes)
    (tmp_path / "story.yaml").write_text(
        "name: handoff\nreference: ref.jpg\nmodel: tiny\nresolution: 64\nsource_prompt: a photo of a bird\n"
        "finetune: {steps: 3, min_steps: 3}\n"
        "defaults: {seeds: 2, steps: 3, edit: {subtract: {gamma: [0.9, 1.2]}}}\n"
        "scenes:\n"
        "  - {id: picked, prompt: a photo of a bird singing, select: {top: 2}, motion: the bird turns its head}\n"
        "  - {id: plain, prompt: a photo of a bird flying}\n"
        "  - {id: auto, prompt: a photo of a bird jumping, forget: auto, auto: {clip: 100, clip_image: -1}}\n"
        "output: out\n"
    )
    result = storyboard_flow(storyboard=str(tmp_path / "story.yaml"))
    run_dir = Path(result["manifest"]).parent
    manifest = json.loads(Path(result["manifest"]).read_text())
    sequence = _sequence(run_dir)
    assert manifest["sequence"] == "sequence.json"
    frames = sequence["frames"]
    assert [f["scene"] for f in frames] == ["picked", "plain", "auto"]  # story order
    picked, plain, auto = frames
    scene_picks = next(s for s in manifest["scenes"] if s["id"] == "picked")["picks"]
    assert picked["chosen_by"] == "pick" and picked["keyframe"]["key"] == scene_picks[0]["key"]
    assert picked["motion"] == "the bird turns its head" and plain["motion"] is None
    assert plain["chosen_by"] == "default" and plain["keyframe"]["key"] == "scenes/plain/0-g0.90-none.png"
    decision = next(s for s in manifest["scenes"] if s["id"] == "auto")["auto"]
    assert decision["overfitted"] and decision["strategies"] == ["encoderattn"]
    assert auto["forget"] == decision["chosen"]  # the frame comes from the strategy forget: auto kept
    for i, frame in enumerate(frames):
        copy = run_dir / frame["key"]
        assert frame["key"] == f"sequence/{i:03d}-{frame['scene']}.png"
        assert copy.read_bytes() == (run_dir / frame["keyframe"]["key"]).read_bytes()
        assert frame["uri"] == str(copy)
    assert sorted(p.name for p in (run_dir / "sequence").iterdir()) == [Path(f["key"]).name for f in frames]
    page = (run_dir / "index.html").read_text()
    assert page.index('class="sequence"') < page.index("<h2") + 200  # the strip comes first


def test_a_resumed_run_writes_the_same_sequence_as_an_uninterrupted_one(tmp_path, photo_bytes):
    path = _story(tmp_path, photo_bytes, "out", scenes=3, steps=25)
    whole = fastimagic("run", str(path), "--run-id", "whole", "-q")
    assert whole.returncode == 0, whole.stderr[-2000:]
    run_dir = tmp_path / "out" / "faults" / "killed"
    proc = _spawn("run", str(path), "--run-id", "killed")
    try:
        _wait_for(lambda: len(list((run_dir / kf.PROGRESS).glob("*/*.json"))) >= 2, 240, proc)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    resumed = fastimagic("run", str(path), "--resume", "killed", "-q")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = _sequence(tmp_path / "out" / "faults" / "whole")
    b = _sequence(run_dir)
    for seq in (a, b):
        seq.pop("run_id")
        for frame in seq["frames"]:
            frame["uri"] = Path(frame["uri"]).name
            frame["keyframe"]["uri"] = Path(frame["keyframe"]["uri"]).name
    assert a == b


def test_a_run_on_s3_writes_its_sequence_there(tmp_path, photo_bytes, s3_server, s3_env):
    bucket = s3_server.make_bucket("handoff")
    path = _board(tmp_path, photo_bytes, output=f"s3://{bucket}/out")
    r = fastimagic("run", str(path), "-q", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/cli-test/")["Contents"]]
    (seq_key,) = [k for k in keys if k.endswith("/sequence.json")]
    sequence = json.loads(client.get_object(Bucket=bucket, Key=seq_key)["Body"].read())
    jsonschema.validate(sequence, SCHEMA)
    assert sequence["frames"][0]["uri"].startswith(f"s3://{bucket}/out/cli-test/")
    assert any(k.endswith("/sequence/000-one.png") for k in keys)
    # the browse: link opens on a private bucket with its images: a page on this machine, image links presigned
    import html
    import urllib.request

    browse = r.stdout.split("browse:")[1].split()[0]
    page = urllib.request.urlopen(browse, timeout=30).read().decode()
    images = [html.unescape(src) for src in re.findall(r'<img[^>]* src="([^"]+)"', page)]
    assert images and all("X-Amz-Signature=" in src for src in images)
    assert urllib.request.urlopen(images[0], timeout=30).read().startswith(b"\x89PNG")


# --- fastimagic runs -------------------------------------------------------------------------------------------


def test_runs_lists_complete_and_incomplete_runs_newest_first(tmp_path, photo_bytes):
    path = _story(tmp_path, photo_bytes, "out", scenes=2, steps=2, seeds=1)
    assert fastimagic("run", str(path), "--run-id", "20260101T000000Z-aaaaaa", "-q").returncode == 0
    assert fastimagic("run", str(path), "--run-id", "20260102T000000Z-bbbbbb", "-q").returncode == 0
    second = tmp_path / "out" / "faults" / "20260102T000000Z-bbbbbb"
    (second / "manifest.json").unlink()  # as if it had been stopped before the end
    shutil.rmtree(second / kf.PROGRESS / "scene-1")
    r = fastimagic("runs", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "2026010" in line]
    assert "20260102T000000Z-bbbbbb" in lines[0] and "incomplete: 2 of 4 written" in lines[0]
    assert "20260101T000000Z-aaaaaa" in lines[1] and "complete" in lines[1]
    listed = json.loads(fastimagic("runs", str(tmp_path / "out"), "--json").stdout)
    assert [(r["run_id"], r["status"]) for r in listed] == [
        ("20260102T000000Z-bbbbbb", "incomplete"),
        ("20260101T000000Z-aaaaaa", "complete"),
    ]
    # the hint is a command that works as pasted, from any folder
    (hint,) = [line for line in r.stdout.splitlines() if line.startswith("continue ")]
    command = shlex.split(hint.split(" with: ")[1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = fastimagic(*command[1:], cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed 20260102T000000Z-bbbbbb: 2 keyframes verified and kept, 2 rendered" in resumed.stdout


def test_runs_on_a_missing_folder_is_exit_2_and_on_an_empty_one_says_so(tmp_path):
    missing = fastimagic("runs", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "nope" in missing.stderr and len(missing.stderr.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    empty = fastimagic("runs", str(tmp_path / "empty"))
    assert empty.returncode == 0 and "no runs under" in empty.stdout


# --- the progress display ------------------------------------------------------------------------------------


class _Stream:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_display_redraws_one_line_in_a_terminal_with_an_estimate():
    now = [0.0]
    out = _Stream()
    display = ProgressDisplay(10, out, tty=True, clock=lambda: now[0])
    display.finetune(1, 2, 0.5)
    now[0] = 2.0
    display.keyframes(4)
    now[0] = 4.0
    display.keyframes(4)
    frames = out.text.split("\r")[1:]
    assert frames[0].startswith("fine-tune 1/2  loss 0.5000")
    assert frames[1].startswith("keyframes 4/10") and frames[2].startswith("keyframes 8/10")
    assert frames[2].rstrip().endswith("00:04 elapsed, ~00:00 left")  # 8 in 2 s: 2 more take 0.5 s
    display.close()  # the bar does not stay on screen: the summary prints on a clean line
    assert "\n" not in out.text and _screen(out.text) == [""]


def _screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: carriage returns go back to column 0 and overwrite."""
    lines, col = [""], 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("")
            col = 0
        else:
            line = lines[-1].ljust(col)
            lines[-1] = line[:col] + ch + line[col + 1 :]
            col += 1
    return [line.rstrip() for line in lines]


def test_progress_owns_its_line_log_lines_never_glue_onto_it_and_the_clock_ticks():
    import logging

    from flows.cli import _ClearsProgress

    now = [0.0]
    out = _Stream()
    display = ProgressDisplay(10, out, tty=True, clock=lambda: now[0], at_most=True)
    display.tick()
    now[0] = 3.0
    display.tick()  # no report for 3 s: the clock moves anyway, and the start is not silent
    assert _screen(out.text) == ["starting  00:03"]
    display.keyframes(2)
    assert _screen(out.text) == ["keyframes 2/up to 10 [####--------------------] 00:03 elapsed"]
    handler = logging.StreamHandler(out)
    handler.addFilter(_ClearsProgress(display))
    logger = logging.getLogger("fastimagic.test-progress")
    logger.addHandler(handler)
    try:
        logger.warning("a log line")
    finally:
        logger.removeHandler(handler)
    now[0] = 4.0
    display.tick()
    assert _screen(out.text) == [
        "a log line", "keyframes 2/up to 10 [####--------------------] 00:04 elapsed, ~00:04 left"
    ]
    display.close()
    display.tick()  # a tick after the end draws nothing
    assert _screen(out.text) == ["a log line", ""]


def test_progress_in_a_narrow_terminal_stays_on_one_line():
    now = [0.0]
    out = _Stream()
    display = ProgressDisplay(80, out, tty=True, clock=lambda: now[0], columns=lambda: 30)
    for i in range(1, 81):
        now[0] = i / 10
        display.keyframes(1)
    frames = out.text.split("\r")[1:]
    assert "\n" not in out.text and all(len(frame) <= 29 for frame in frames)
    assert frames[40].startswith("keyframes 41/80 00:04 elapsed")  # the bar goes first, the numbers stay


def test_progress_display_without_a_terminal_writes_a_line_every_few_seconds():
    now = [0.0]
    out = _Stream()
    display = ProgressDisplay(6, out, tty=False, interval=5.0, clock=lambda: now[0])
    for i in range(1, 5):
        now[0] = float(i)
        display.keyframes(1)  # 1 s apart: only the first makes a line within 5 s
    now[0] = 7.0
    display.keyframes(2)  # the last one always makes a line
    lines = out.text.splitlines()
    assert [line.split()[2] for line in lines] == ["1/6", "6/6"]
    assert all(line.startswith("progress: ") for line in lines)


PREFECT_LINE = "Finished in state"


def _pty_run(args: list[str], timeout: float = 300, columns: int = 120, env: dict | None = None) -> tuple[int, str]:
    """Run fastimagic with stdin/stdout/stderr on a pseudo-terminal ``columns`` wide, as typed in it (default
    signals); return (exit code, everything it wrote)."""
    import fcntl
    import struct
    import termios

    from test_cli import as_typed_in_a_terminal

    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("COLUMNS", None)  # the terminal's own size, as in a real one
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], stdin=child, stdout=child, stderr=child,
                            cwd=ROOT, env=env, close_fds=True, preexec_fn=as_typed_in_a_terminal)
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([parent], [], [], 0.5)
        if ready:
            try:
                data = os.read(parent, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(parent)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


@pytest.fixture()
def story(tmp_path, photo_bytes):
    return _story(tmp_path, photo_bytes, "out", scenes=2, steps=2, seeds=2)


def test_run_in_a_terminal_shows_one_moving_display_and_no_prefect_lines(story):
    code, text = _pty_run(["run", str(story)])
    assert code == 0, text[-2000:]
    redraws = [part.strip() for part in text.split("\r") if part.strip().startswith(("fine-tune", "keyframes"))]
    counts = [part.split()[1] for part in redraws if part.startswith("keyframes")]
    assert any(r.startswith("fine-tune 4/4") for r in redraws)
    assert len(counts) >= 2 and counts[-1] == "8/8" and counts == sorted(counts, key=lambda c: int(c.split("/")[0]))
    assert PREFECT_LINE not in text and "8 keyframes for 'faults'" in text


def test_run_in_a_pipe_logs_progress_lines(story):
    quiet_default = fastimagic("run", str(story))
    assert quiet_default.returncode == 0, quiet_default.stderr[-2000:]
    assert "progress: keyframes 8/8" in quiet_default.stderr and PREFECT_LINE not in quiet_default.stderr


def test_verbose_in_a_narrow_terminal_prints_named_lines_that_never_share_the_progress_line(story, tmp_path):
    """-v in a 50-column terminal, on a first run (a fresh Prefect home): every log line starts its own line and
    names its task (the scene, for renders), the progress line never wraps and is gone at the end, and Prefect's
    first-run telemetry notice does not appear."""
    code, text = _pty_run(["run", str(story), "-v"], columns=50, env={"PREFECT_HOME": str(tmp_path / "ph")})
    assert code == 0, text[-2000:]
    screen = _screen(text.replace("\r\n", "\n"))
    assert "Prefect collects anonymous usage data" not in text
    assert not any(line.startswith(("starting", "fine-tune", "keyframes")) for line in screen), screen
    assert all(line.startswith("INFO ") for line in screen if "INFO " in line), screen  # nothing glued before
    assert "INFO render scene-1 seeds 0, 1: Finished in state Completed()" in screen  # a unit: the scene's seeds
    frames = [f for f in re.split("[\r\n]", text) if f.startswith(("starting", "fine-tune", "keyframes"))]
    assert frames[0].startswith("starting") and all(len(f) <= 49 for f in frames), frames


def test_quiet_run_prints_only_the_summary(story):
    r = fastimagic("run", str(story), "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.strip() == "" and r.stdout.startswith("8 keyframes for 'faults'")
