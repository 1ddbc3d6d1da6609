"""Hostile and careless input (issue 14): safeguard holes, resource bombs, names that would collide, values checked
late, and messages that name the thing and what to do. Each test names its case; docs/reliability.md lists them."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest
from test_cli import fastimagic

from fastimagic.errors import InputError
from fastimagic.images import load_reference
from fastimagic.store import StoreError, read_uri
from fastimagic.storyboard_yaml import StoryboardError, load_storyboard

HEAD = "name: demo\nreference: ref.png\nmodel: tiny\n"


def problems(tmp_path: Path, text: str | bytes) -> list[str]:
    path = tmp_path / "story.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(StoryboardError) as info:
        load_storyboard(path)
    return info.value.problems


def _scene(edit: str) -> str:
    return HEAD + f"scenes:\n  - id: a\n    prompt: a dog\n    edit: {edit}\n"


# --- 2. safeguards with holes -----------------------------------------------------------------------------------


def _diffusers_folder(root: Path, weights: str) -> Path:
    (root / "model_index.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text("{}")
    for part in ("unet", "vae", "text_encoder"):
        (root / part).mkdir(exist_ok=True)
        (root / part / "config.json").write_text("{}")
        (root / part / f"diffusion_pytorch_model.{weights}").write_bytes(b"weights")
    return root


def test_a_diffusers_folder_of_pickle_bin_weights_needs_allow_pickle(tmp_path):
    from fastimagic.models import model_identity

    folder = _diffusers_folder(tmp_path / "sd", "bin")
    with pytest.raises(InputError, match=r"weights of unet, vae, text_encoder are pickle files .*allow_pickle: true"):
        model_identity(str(folder))
    assert model_identity(str(folder), allow_pickle=True).startswith("folder:sd:")
    assert model_identity(str(_diffusers_folder(tmp_path / "safe", "safetensors"))).startswith("folder:safe:")


def test_a_vae_override_of_pickle_weights_needs_allow_pickle(tmp_path):
    from fastimagic.models import model_identity

    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"weights")
    with pytest.raises(InputError, match=r"^vae: .*weights of vae are pickle files .*allow_pickle: true"):
        model_identity("tiny", vae=str(folder))
    assert "+vae:folder:vae:" in model_identity("tiny", vae=str(folder), allow_pickle=True)
    (tmp_path / "vae.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InputError, match=r"^vae: .*vae.ckpt: pickle checkpoints .* can run code"):
        model_identity("tiny", vae=str(tmp_path / "vae.ckpt"))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    assert "+vae:folder:vae:" in model_identity("tiny", vae=str(folder))  # safetensors beside it: loaded instead


def test_a_cached_hub_snapshot_of_pickle_weights_needs_allow_pickle(tmp_path, monkeypatch):
    import fastimagic.models as models

    snapshot = _diffusers_folder(tmp_path / "snapshot", "bin")
    monkeypatch.setattr(models, "_hub_snapshot", lambda repo_id: snapshot)
    with pytest.raises(InputError, match="org/pickled: the weights of unet"):
        models.model_identity("org/pickled")


def test_a_password_in_the_endpoint_url_is_never_printed(tmp_path):
    env = {"AWS_ENDPOINT_URL": "http://admin:hunter2-secret@127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s"}
    r = fastimagic("runs", "s3://some-bucket/out", env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "hunter2-secret" not in r.stdout + r.stderr and "***@127.0.0.1:9" in r.stderr


def test_only_raster_formats_are_accepted_and_others_are_refused_by_name():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n%%EndComments\nshowpage\n"
    with pytest.raises(InputError, match="x.eps: EPS images are not accepted as references; use a PNG, JPEG"):
        load_reference(eps, "x.eps")


def test_the_first_frame_of_an_animated_gif_is_the_reference():
    from PIL import Image

    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    image = load_reference(buf.getvalue(), "a.gif")
    assert image.size == (64, 64) and image.getpixel((0, 0)) == (255, 0, 0)


# --- 3. resource bombs ------------------------------------------------------------------------------------------


def test_alpha_beta_pairs_are_counted_not_expanded(tmp_path):
    edit = "{project: {alpha: {from: 0, to: 99.98, step: 0.01}, beta: {from: 0, to: 99.98, step: 0.01}}}"
    found = problems(tmp_path, _scene(edit))
    assert any("9999 alpha x 9999 beta values make 99980001 pairs, more than max_keyframes (10000)" in p
               for p in found)


@pytest.mark.parametrize("target", ["/dev/zero", "link"])
def test_a_device_or_a_link_to_one_is_refused_without_reading(tmp_path, target):
    if target == "link":
        (tmp_path / "link").symlink_to("/dev/zero")
        target = str(tmp_path / "link")
    with pytest.raises(StoreError, match="is a device, expected a regular file"):
        read_uri(target)
    (tmp_path / "ref.png").symlink_to("/dev/zero")
    r = fastimagic("run", str(_story(tmp_path)))
    assert r.returncode == 2 and "is a device, expected a regular file" in r.stderr, r.stderr


def _story(tmp_path: Path) -> Path:
    text = HEAD + "resolution: 64\nsource_prompt: a dog\noutput: out\n"
    text += "defaults: {seeds: 1, steps: 2, edit: {subtract: {gamma: [1.0]}}}\nscenes:\n  - {id: a, prompt: a dog}\n"
    path = tmp_path / "story.yaml"
    path.write_text(text)
    return path


def test_a_fifo_storyboard_or_reference_is_refused_at_once(tmp_path):
    fifo = tmp_path / "story.yaml"
    os.mkfifo(fifo)
    done = threading.Event()
    found: list = []

    def validate():
        try:
            load_storyboard(fifo)
        except StoryboardError as e:
            found.append(str(e))
        done.set()

    threading.Thread(target=validate, daemon=True).start()
    assert done.wait(10), "validate blocked on a FIFO"
    assert found and "is a FIFO, expected a regular file" in found[0]
    os.mkfifo(tmp_path / "ref.fifo")
    with pytest.raises(StoreError, match="is a FIFO"):
        read_uri(str(tmp_path / "ref.fifo"))


def test_references_over_the_size_limit_are_refused_unread(tmp_path):
    (tmp_path / "big.png").write_bytes(b"\0" * 2000)
    with pytest.raises(StoreError, match="is 2,000 bytes, more than the limit of 1,000"):
        read_uri(str(tmp_path / "big.png"), max_bytes=1000)


def test_prompts_are_bounded_and_huge_storyboards_refused(tmp_path):
    found = problems(tmp_path, HEAD + "scenes:\n  - {id: a, prompt: '" + "x" * 3000 + "'}\n")
    assert any("scenes[0].prompt: is 3000 characters, more than 2000" in p for p in found)
    [problem] = problems(tmp_path, HEAD + "scenes:\n  - {id: a, prompt: '" + "x" * 10_000_000 + "'}\n")
    assert "cannot read the storyboard: is 10,000" in problem and "more than the limit of 1,000,000" in problem


def test_a_5000_digit_integer_is_a_line_not_a_valueerror(tmp_path):
    [problem] = problems(tmp_path, HEAD + "scenes:\n  - {id: a, prompt: p, seeds: " + "9" * 5000 + "}\n")
    assert problem == "story.yaml:5: a number of 5000 characters; numbers here have at most 40".replace(
        "story.yaml", str(tmp_path / "story.yaml"))


@pytest.mark.parametrize("chunk", ["text", "icc"])
def test_png_decompression_bombs_in_metadata_name_the_file(chunk):
    from PIL import Image, PngImagePlugin

    buf = io.BytesIO()
    if chunk == "text":
        info = PngImagePlugin.PngInfo()
        info.add_text("comment", "a" * 3_000_000, zip=True)
        Image.new("RGB", (64, 64)).save(buf, "PNG", pnginfo=info)
    else:
        Image.new("RGB", (64, 64)).save(buf, "PNG", icc_profile=b"\0" * 3_000_000)
    with pytest.raises(InputError, match=r"^bomb.png: image header is corrupt or too large to read safely"):
        load_reference(buf.getvalue(), "bomb.png")


# --- 5. names that would collide ----------------------------------------------------------------------------------


def test_two_gammas_that_round_to_one_name_are_refused(tmp_path):
    found = problems(tmp_path, _scene("{subtract: {gamma: [1.001, 1.004]}}"))
    assert any("1.001 and 1.004 would both name keyframes '1.00'" in p for p in found)
    found = problems(tmp_path, _scene("{subtract: {gamma: {from: 1.0, to: 1.1, step: 0.001}}}"))
    assert any("would both name keyframes" in p for p in found)


# --- 6. checked at validate time --------------------------------------------------------------------------------


def test_huge_coefficients_are_refused(tmp_path):
    found = problems(tmp_path, _scene("{subtract: {gamma: [1.0, 1e300]}}"))
    assert any("scenes[0].edit.subtract.gamma[1]: 1e+300 is outside -100.0..100.0" in p for p in found)


@pytest.mark.parametrize("uri", ["s3://bucket/refs/../secret/x.png", "s3://bucket//x.png", "s3://bucket/./x.png"])
def test_s3_keys_with_dot_segments_or_empty_segments_are_refused(tmp_path, uri):
    [problem] = problems(tmp_path, HEAD.replace("ref.png", uri) + "scenes:\n  - {id: a, prompt: p}\n")
    assert ":2 reference: s3 URI" in problem and ("segment" in problem or "'//'" in problem)


# --- 7. messages --------------------------------------------------------------------------------------------------


def test_a_utf16_storyboard_is_told_to_save_as_utf8(tmp_path):
    [problem] = problems(tmp_path, (HEAD + "scenes: []\n").encode("utf-16"))
    assert problem.endswith("story.yaml: UTF-16 text; save the storyboard as UTF-8")


def test_a_big_file_without_aliases_is_not_told_about_aliases(tmp_path):
    [problem] = problems(tmp_path, HEAD + "scenes: [" + "1, " * 100_001 + "]\n")
    assert "aliases" not in problem and "has more than 100000 values" in problem


# --- 5. resume proves what it keeps -------------------------------------------------------------------------------

RESUME_STORY = """\
name: resume
reference: ref.jpg
model: tiny
resolution: 64
source_prompt: a photo of a bird
finetune: {steps: 2, min_steps: 2}
defaults: {seeds: 1, steps: 2, edit: {subtract: {gamma: [1.0]}}}
output: out
scenes:
  - {id: one, prompt: a photo of a bird flying}
  - {id: two, prompt: a photo of a bird sitting}
"""


def _resume_story(tmp_path: Path, photo_bytes: bytes, text: str = RESUME_STORY) -> Path:
    (tmp_path / "ref.jpg").write_bytes(photo_bytes)
    path = tmp_path / "story.yaml"
    path.write_text(text)
    return path


def _interrupted_run(tmp_path: Path, photo_bytes: bytes) -> tuple[Path, str]:
    """A finished run with its manifest removed: what an interrupted run leaves behind."""
    from flows.storyboard import storyboard_flow

    path = _resume_story(tmp_path, photo_bytes)
    result = storyboard_flow(storyboard=str(path), run_id="r1")
    (Path(result["manifest"])).unlink()
    return path, "r1"


def test_resume_after_editing_the_storyboard_refuses_saying_what_changed(tmp_path, photo_bytes):
    from flows.storyboard import storyboard_flow

    path, run_id = _interrupted_run(tmp_path, photo_bytes)
    for old, new, said in [
        ("a photo of a bird flying", "a photo of a cat flying", "changed: prompt"),
        ("defaults: {seeds: 1, steps: 2,", "defaults: {seeds: 1, steps: 2, guidance: 5.0,", "changed: guidance"),
        ("finetune: {steps: 2, min_steps: 2}", "finetune: {steps: 2, min_steps: 2, seed: 7}", "the fine-tune"),
    ]:
        path.write_text(RESUME_STORY.replace(old, new))
        with pytest.raises(InputError, match=said):
            storyboard_flow(storyboard=str(path), run_id=run_id, resume=True)
    path.write_text(RESUME_STORY)  # the same storyboard resumes, keeping both scenes' keyframes
    result = storyboard_flow(storyboard=str(path), run_id=run_id, resume=True)
    assert result["kept"] == 2 and result["keyframes"] == 2


def test_resume_with_fewer_scenes_is_refused_so_no_unlisted_files_stay(tmp_path, photo_bytes):
    from flows.storyboard import storyboard_flow

    path, run_id = _interrupted_run(tmp_path, photo_bytes)
    path.write_text(RESUME_STORY.split("  - {id: two")[0])
    with pytest.raises(InputError, match=r"has scenes the storyboard no longer lists \(two\)"):
        storyboard_flow(storyboard=str(path), run_id=run_id, resume=True)


def test_resume_of_an_unknown_run_id_exits_2(tmp_path, photo_bytes):
    path = _resume_story(tmp_path, photo_bytes)
    r = fastimagic("run", str(path), "--resume", "20990101T000000Z-abcdef")
    assert r.returncode == 2, r.stderr
    assert "no run 20990101T000000Z-abcdef of 'resume' under" in r.stderr and "fastimagic runs" in r.stderr
    assert not any((tmp_path / "out").rglob("*.png"))


# --- 4. hangs and orphans -----------------------------------------------------------------------------------------


def _running_cli(tmp_path: Path, photo_bytes: bytes):
    import subprocess
    import sys
    import time

    from test_cli import ROOT, as_typed_in_a_terminal

    path = _resume_story(tmp_path, photo_bytes, RESUME_STORY.replace("steps: 2, edit", "steps: 400, edit"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(path), "--run-id", "sig"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=as_typed_in_a_terminal,  # SIGINT at its default, as from a terminal, however the suite started
    )
    plan = tmp_path / "out" / "resume" / "sig" / "run.json"
    deadline = time.monotonic() + 240
    while not plan.exists():  # the flow has started: Prefect's embedded server is up
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    return proc


def _read_all(proc, timeout: float) -> str:
    """Everything the process and whatever shares its stdout write, until EOF; fails if EOF takes too long."""
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), "stdout stayed open: a child outlived the CLI"
    return out[0]


@pytest.mark.parametrize(
    "name, group",
    [
        ("SIGTERM", False),  # `kill PID`, a process supervisor
        ("SIGHUP", False),  # the terminal closed
        ("SIGINT", True),  # Ctrl-C: the terminal signals the whole foreground group, the embedded server included
    ],
)
def test_a_signal_mid_run_stops_the_server_and_exits_128_plus_it_with_a_line(tmp_path, photo_bytes, name, group):
    import signal

    signum = getattr(signal, name)
    proc = _running_cli(tmp_path, photo_bytes)
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    output = _read_all(proc, 90)  # EOF: nothing the CLI started outlives it
    assert proc.wait(30) == 128 + signum, output[-3000:]
    last = output.rstrip().splitlines()[-1]
    assert last.startswith(f"fastimagic: stopped by {name}; nothing more is written; continue it with: "), last
    assert "Traceback" not in output
    if name == "SIGINT":  # the hint is a command that works as pasted
        import shlex

        command = shlex.split(last.split("continue it with: ")[1])
        assert command[:2] == ["fastimagic", "run"] and "--resume" in command and "sig" in command
        # One torch thread: the resume renders 2 x 400 steps, and on a shared 2-core machine torch's default two
        # threads wait on each other (measured with two busy processes beside it: 108 s, one thread 39 s; in a
        # loaded suite it ran past the 600 s timeout)
        r = fastimagic(*command[1:], env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0 and "resumed sig: " in r.stdout, r.stderr[-3000:]


def test_a_signal_that_surfaces_as_another_error_still_ends_as_stopped():
    """A signal landing inside Prefect's bookkeeping can end the run as another error raised while handling it
    (seen: ``ValueError: Task run is not set`` while Prefect recorded the crash); it is still reported as the
    signal, and a plain error is not."""
    import signal

    from prefect.exceptions import TerminationSignal

    from flows.cli import Stopped, _stop_signal

    def raised_while_handling(interrupt: BaseException) -> ValueError:
        try:
            try:
                raise interrupt
            except BaseException:
                raise ValueError("Task run is not set") from None  # no cause, the interrupt is its context
        except ValueError as e:
            return e

    assert _stop_signal(raised_while_handling(TerminationSignal(signal.SIGTERM))) == signal.SIGTERM
    assert _stop_signal(raised_while_handling(Stopped(signal.SIGHUP))) == signal.SIGHUP
    assert _stop_signal(raised_while_handling(KeyboardInterrupt())) == signal.SIGINT
    assert _stop_signal(ValueError("a plain error")) is None


def test_a_stop_signal_python_drops_is_delivered_again():
    """A KeyboardInterrupt raised where Python cannot propagate it (here a finalizer) is printed and dropped; the
    handler delivers the signal again until the CLI is handling the end of the run."""
    import signal
    import subprocess
    import sys

    from test_cli import ROOT

    code = """
import signal, sys, time
from flows import cli
cli.REDELIVER_SECONDS = 0.5
signal.signal(signal.SIGHUP, cli._on_signal)
class Finalizer:
    def __\x64el__(self):
        cli._on_signal(signal.SIGHUP, None)  # raises Stopped inside a finalizer: Python drops it
Finalizer()
started = time.monotonic()
try:
    time.sleep(60)
    print("not delivered again")
except KeyboardInterrupt as e:
    # ended the blocking wait, not only after it (0.5 s, not 60)
    print("delivered again:", cli._stop_signal(e), "wait ended early:", time.monotonic() - started < 30)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "Exception ignored" in r.stderr  # the first one was dropped
    assert r.stdout.strip() == f"delivered again: {int(signal.SIGHUP)} wait ended early: True", r.stdout + r.stderr


def test_a_signal_ignored_by_the_launcher_stays_ignored_and_a_default_one_is_handled():
    """``nohup fastimagic run`` (SIGHUP ignored) and a background job (SIGINT ignored) keep what they inherited, the
    Unix convention; from a terminal (defaults), the CLI handles each to end the run cleanly."""
    import signal
    import subprocess
    import sys

    from test_cli import ROOT

    code = (
        "import signal\nfrom flows import cli\ncli._supervise()\n"
        "print(*(signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)))"
    )

    def ignored(*inherited: signal.Signals) -> str:
        def launcher() -> None:
            for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN if sig in inherited else signal.SIG_DFL)

        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL, preexec_fn=launcher)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    assert ignored() == "False False False"  # a terminal: every stop signal ends the run cleanly
    assert ignored(signal.SIGHUP) == "False True False"  # nohup
    assert ignored(signal.SIGINT) == "True False False"  # `fastimagic run ... &` from a script


def test_sigkill_mid_run_leaves_no_server_behind(tmp_path, photo_bytes):
    import signal

    proc = _running_cli(tmp_path, photo_bytes)
    os.kill(proc.pid, signal.SIGKILL)  # the CLI alone, not its process group
    _read_all(proc, 60)  # EOF: the embedded server holding the same stdout died with the CLI
    assert proc.wait(10) == -signal.SIGKILL


# --- 7. messages --------------------------------------------------------------------------------------------------


def test_control_characters_cannot_forge_lines(tmp_path):
    path = tmp_path / "story.yaml"
    path.write_text(HEAD + 'scenes:\n  - {id: "a\\e[2J", prompt: p, forget: "x\\nfastimagic: ok"}\n')
    r = fastimagic("validate", str(path))
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert not any(line.startswith("fastimagic: ok") for line in lines), r.stderr
    assert "\x1b" not in r.stderr and "\\x1b[2J" in r.stderr and "x\\nfastimagic: ok" in r.stderr


def test_a_unicode_name_gets_an_ascii_slug(tmp_path):
    path = tmp_path / "story.yaml"
    path.write_text(HEAD.replace("name: demo", "name: 海辺の一日") + "scenes:\n  - {id: a, prompt: p}\n",
                    encoding="utf-8")
    board = load_storyboard(path)
    assert board.slug.startswith("u-") and board.slug.isascii() and board.slug.replace("-", "").isalnum()


# --- 6. checked before the flow starts; one line, no traceback ------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--run-id", "../x"), ("--resume", "a b"), ("--run-id", "")])
def test_run_id_syntax_is_checked_first(tmp_path, photo_bytes, flag, value):
    path = _resume_story(tmp_path, photo_bytes)
    r = fastimagic("run", str(path), flag, value)
    assert r.returncode == 2 and f"{flag} {value!r}: a run id is" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_an_empty_output_is_a_message(tmp_path, photo_bytes):
    r = fastimagic("run", str(_resume_story(tmp_path, photo_bytes)), "--output", "")
    assert r.returncode == 2 and "--output '': give a folder or s3://bucket/prefix" in r.stderr


def test_a_refusal_inside_the_flow_is_one_line_without_a_traceback(tmp_path, photo_bytes):
    path, run_id = _interrupted_run(tmp_path, photo_bytes)
    path.write_text(RESUME_STORY.replace("a photo of a bird flying", "a photo of a cat flying"))
    r = fastimagic("run", str(path), "--resume", run_id)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "changed: prompt" in r.stderr.splitlines()[-1]


def test_a_null_key_is_named_at_its_line(tmp_path):
    [problem] = problems(tmp_path, HEAD + "~: 3\nscenes: [{id: a, prompt: p}]\n")
    assert problem.endswith("story.yaml:4: key '~' is YAML's null, not a field name; write the field's name"
                            " (or put it in quotes)")


def test_validate_reads_an_s3_storyboard_as_strictly_as_a_local_file(s3_server, s3_env):
    bucket = s3_env
    client = s3_server.client()
    good = "name: x\nreference: refs/r.png\nmodel: tiny\nscenes: [{id: a, prompt: caf\u00e9}]\n"
    client.put_object(Bucket=bucket, Key="good.yaml", Body=good.encode())
    client.put_object(Bucket=bucket, Key="latin1.yaml", Body=good.encode("latin-1"))
    env = s3_server.env()
    r = fastimagic("validate", f"s3://{bucket}/good.yaml", env=env)
    assert r.returncode == 0 and f"s3://{bucket}/good.yaml: ok: 1 scene, 16 keyframes" in r.stdout, r.stderr
    r = fastimagic("validate", f"s3://{bucket}/latin1.yaml", env=env)
    assert r.returncode == 2 and f"s3://{bucket}/latin1.yaml: not UTF-8 text" in r.stderr


def test_open_of_the_root_folder_is_a_message():
    r = fastimagic("open", "/")
    assert r.returncode == 2 and "open '/': give a run folder" in r.stderr


def test_submit_without_a_server_or_with_an_unreachable_one(tmp_path, photo_bytes):
    path = _resume_story(tmp_path, photo_bytes)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"references: [{tmp_path}]\noutputs: [{tmp_path}]\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    args = ("submit", str(path), "--deployment", "storyboard/storyboard", "--policy", str(policy))
    import subprocess
    import sys

    from test_cli import ROOT

    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=ROOT,
                       stdin=subprocess.DEVNULL,
                       env={**env, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "ph")}, timeout=300)
    assert r.returncode == 2 and "none is set: set PREFECT_API_URL" in r.stderr, r.stderr
    r = fastimagic(*args, env={"PREFECT_API_URL": "http://user:pw-secret@127.0.0.1:9/api"}, timeout=300)
    assert r.returncode == 1 and "cannot reach the Prefect server at http://***@127.0.0.1:9/api" in r.stderr
    assert "pw-secret" not in r.stderr and "Traceback" not in r.stderr


def test_an_endpoint_that_is_not_s3_is_named(tmp_path):
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}", "AWS_ACCESS_KEY_ID": "k",
               "AWS_SECRET_ACCESS_KEY": "s"}
        r = fastimagic("runs", "s3://some-bucket/out", env=env, timeout=120)
    finally:
        server.shutdown()
    assert r.returncode == 1 and "is it an S3 server?" in r.stderr, r.stderr
