"""The fastimagic command as a person uses it: exit codes, one-line errors, nothing written on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def as_typed_in_a_terminal() -> None:
    """``preexec_fn`` for a command a test starts: the signal dispositions a command typed in a terminal starts
    with. A suite launched as a background job (``pytest &``) or under ``nohup`` has SIGINT or SIGHUP ignored, every
    child inherits that, and the CLI rightly keeps an inherited SIG_IGN (the Unix convention): a test of what
    Ctrl-C or a closed terminal does sets up the disposition it tests, so the suite passes however it is launched.
    (Only SIG_IGN survives exec; handlers the test process installed reset to the default anyway.)"""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def fastimagic(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run the CLI as a person would from a terminal (default signals, nothing on stdin); the test's own stdin,
    which a background job or CI may have closed, is never inherited."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
        preexec_fn=as_typed_in_a_terminal,
    )


def _board(tmp_path: Path, photo_bytes: bytes, **fields) -> Path:
    (tmp_path / "ref.jpg").write_bytes(photo_bytes)
    values = {
        "name": "cli-test",
        "reference": "ref.jpg",
        "model": "tiny",
        "resolution": "64",
        "source_prompt": "a photo of a bird",
        "finetune": "{steps: 3, min_steps: 3}",
        "output": "out",
    } | fields
    text = "".join(f"{k}: {v}\n" for k, v in values.items())
    text += "defaults: {seeds: 1, steps: 3, edit: {subtract: {gamma: [1.0]}}}\n"
    text += "scenes:\n  - {id: one, prompt: a photo of a bird flying, forget: [none, encoderattn]}\n"
    path = tmp_path / "story.yaml"
    path.write_text(text)
    return path


def test_validate_ok(tmp_path, photo_bytes):
    r = fastimagic("validate", str(_board(tmp_path, photo_bytes)))
    assert r.returncode == 0, r.stderr
    assert "ok: 1 scene, 2 keyframes, 64 (shorter side, the reference's aspect)" in r.stdout


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # The bucket rule of the store is the schema's: what `run` would refuse, `validate` refuses, with a line.
        ({"reference": "s3://My_Bucket/a.png"}, "story.yaml:2 reference: s3 URI 's3://My_Bucket/a.png': bucket"
                                                " 'My_Bucket' is not a valid bucket name"),
        ({"scorer": "none", "defaults": "{seeds: 1, steps: 3, forget: auto}"},
         "story.yaml:8 scorer: none, but scenes one use forget: auto or select, which need scores"),
    ],
)
def test_validate_and_run_refuse_the_same_storyboards_with_file_and_line(tmp_path, photo_bytes, fields, expected):
    path = _board(tmp_path, photo_bytes, **fields)
    if "defaults" in fields:  # the scene's own forget list would override the default
        path.write_text(path.read_text().replace("forget: [none, encoderattn]", "forget: auto")
                        .replace("defaults: {seeds: 1, steps: 3, edit: {subtract: {gamma: [1.0]}}}\n", ""))
    for command in ("validate", "run"):
        r = fastimagic(command, str(path))
        assert r.returncode == 2, (command, r.stderr)
        assert expected in r.stderr, (command, r.stderr)
    assert not (tmp_path / "out").exists()


def test_invalid_storyboard_exits_2_with_every_problem_and_writes_nothing(tmp_path, photo_bytes):
    path = _board(tmp_path, photo_bytes)
    path.write_text(path.read_text().replace("forget: [none, encoderattn]", "forget: encoderatn, promt: x"))
    for command in ("validate", "run"):
        r = fastimagic(command, str(path))
        assert r.returncode == 2, r.stderr
        assert "story.yaml:10 scenes[0].forget: unknown strategy 'encoderatn' (did you mean 'encoderattn'?)" in r.stderr
        assert "scenes[0].promt" in r.stderr and "did you mean 'prompt'" in r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "setup,expected",
    [
        (lambda d: (d / "ref.jpg").unlink(), "ref.jpg: no such file"),
        (lambda d: (d / "ref.jpg").write_bytes(b""), "ref.jpg: the file is empty"),
        (lambda d: (d / "ref.jpg").write_text("not an image"), "ref.jpg: not an image"),
    ],
)
def test_bad_reference_exits_2_naming_the_file_and_writes_nothing(tmp_path, photo_bytes, setup, expected):
    path = _board(tmp_path, photo_bytes)
    setup(tmp_path)
    r = fastimagic("run", str(path))
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_model_path_exits_2(tmp_path, photo_bytes):
    r = fastimagic("run", str(_board(tmp_path, photo_bytes, model="./models/nope.safetensors")))
    assert r.returncode == 2
    expected = f"story.yaml:3 model: ./models/nope.safetensors: no such file ({tmp_path}/models/nope.safetensors)"
    assert expected in r.stderr


def test_validate_names_every_missing_or_wrong_kind_local_file_with_its_line(tmp_path, photo_bytes):
    """What can be known without loading weights is known at validate time, all at once, as run says it."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-a-model").mkdir()
    path = _board(tmp_path, photo_bytes, model="./ckpt.safetensors", model_config="./sd15-config", vae="./a-file",
                  reference="missing.png")
    for command in ("validate", "run"):
        r = fastimagic(command, str(path))
        assert r.returncode == 2, r.stderr
        assert r.stderr.splitlines() == [
            f"fastimagic: {path}:3 model: ./ckpt.safetensors: no such file ({tmp_path}/ckpt.safetensors); expected a"
            " .safetensors checkpoint file",
            f"{path}:8 model_config: ./sd15-config: no such folder ({tmp_path}/sd15-config); expected a local"
            " diffusers folder or a hub repo id",
            f"{path}:9 vae: ./a-file: is a file, expected a folder: a local diffusers folder or a hub repo id",
            f"{path}:2 reference: missing.png: no such file ({tmp_path}/missing.png); expected the reference image"
            " (relative paths start at the storyboard's folder)",
        ], r.stderr
    r = fastimagic("validate", str(_board(tmp_path, photo_bytes, model="./not-a-model")))
    assert r.returncode == 2 and "model: ./not-a-model: not a diffusers model folder (no model_index.json" in r.stderr


@pytest.mark.parametrize("name", ["demo", "story-beach", "tedbench"])
def test_every_shipped_storyboard_validates_or_says_what_to_bring(name):
    """The examples that need files fastimagic cannot ship (a community checkpoint, TEdBench's images) say which,
    with the line, and their comments say where to get them."""
    path = ROOT / "storyboards" / f"{name}.yaml"
    r = fastimagic("validate", str(path))
    missing = {"story-beach": ROOT / "storyboards" / "models" / "realisticVisionV60B1_v51HyperVAE.safetensors",
               "tedbench": ROOT / "storyboards" / "tedbench" / "bird.jpeg"}.get(name)
    if missing is None or missing.exists():
        assert r.returncode == 0 and ": ok: " in r.stdout, r.stderr
    else:
        assert r.returncode == 2 and f"no such file ({missing})" in r.stderr, r.stderr
        assert str(missing.relative_to(ROOT)) in path.read_text()  # the comment says where it goes


def test_s3_output_problems_are_one_line_naming_the_uri_without_secrets(tmp_path, photo_bytes, s3_server, s3_env):
    bucket = s3_env
    env = s3_server.env()
    cases = [
        ({**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, f"s3://{bucket}/out", "cannot reach S3 endpoint"),
        ({**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-123"}, f"s3://{bucket}/out", "access denied"),
        (env, "s3://no-such-bucket-fastimagic/out", "bucket 'no-such-bucket-fastimagic' does not exist"),
    ]
    for case_env, output, expected in cases:
        r = fastimagic("run", str(_board(tmp_path, photo_bytes, output=output)), env=case_env)
        assert r.returncode == 1, r.stderr
        assert expected in r.stderr and output in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        for secret in (env["AWS_SECRET_ACCESS_KEY"], "wrong-secret-123"):
            assert secret not in r.stderr + r.stdout


def test_malformed_s3_output_uri_is_invalid_input(tmp_path, photo_bytes):
    r = fastimagic("validate", str(_board(tmp_path, photo_bytes, output="s3:///nobucket")))
    assert r.returncode == 2 and "story.yaml:7 output:" in r.stderr


def test_run_writes_keyframes_locally_and_says_where(tmp_path, photo_bytes):
    path = _board(tmp_path, photo_bytes)
    r = fastimagic("run", str(path), "--output", str(tmp_path / "elsewhere"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 keyframes for 'cli-test' in " in r.stdout
    manifest_path = Path(r.stdout.split("manifest: ")[1].split("\n")[0])
    assert manifest_path.parent.parent.parent == tmp_path / "elsewhere"
    manifest = json.loads(manifest_path.read_text())
    assert [k["forget"] for k in manifest["keyframes"]] == ["none", "encoderattn"]
    assert (manifest_path.parent / "index.html").is_file()
    assert not (tmp_path / "out").exists()  # --output overrides the storyboard's


def test_strategies_lists_each_with_what_it_touches():
    r = fastimagic("strategies")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "forgets" in line]
    assert len(lines) == 9
    assert "587,642,560 parameters" in r.stdout  # SD 1.5's default (the released code's) trained blocks
    assert any(line.split()[0] == "encoderattn" for line in lines)


def test_strategies_on_sdxl_name_the_levels_by_width():
    r = fastimagic("strategies", "--model", "sdxl")
    assert r.returncode == 0, r.stderr
    assert "SDXL), trained blocks 'reference' (down_blocks.1, down_blocks.2, up_blocks.1, up_blocks.2)" in r.stdout
    assert "935,025,280 parameters" in r.stdout
    decoder2 = next(line for line in r.stdout.splitlines() if line.split()[0] == "decoderattn+decoder2")
    assert decoder2.endswith("the whole up_blocks.1")  # SD 1.x's up_blocks.2 is SDXL's up_blocks.1 (640 channels)


def test_caption_with_the_tiny_blip(tmp_path, photo_bytes):
    (tmp_path / "p.jpg").write_bytes(photo_bytes)
    r = fastimagic("caption", str(tmp_path / "p.jpg"), "--model", "tiny")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_caption_without_network_fails_at_once_with_what_to_do(tmp_path, photo_bytes):
    """BLIP not in the cache and the hub unreachable (a closed port on loopback): one line saying how to get it,
    not minutes of retries; with HF_HUB_OFFLINE=1, one line too."""
    import socket

    (tmp_path / "p.jpg").write_bytes(photo_bytes)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": endpoint, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "flows.cli", "caption", str(tmp_path / "p.jpg")]
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr[-3000:]
    assert f"Salesforce/blip-image-captioning-base: not in the Hugging Face cache, and {endpoint} cannot be reached" \
        in r.stderr and "huggingface-cli download Salesforce/blip-image-captioning-base" in r.stderr
    r = fastimagic("caption", str(tmp_path / "p.jpg"), env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr[-3000:]
    assert "cannot load the BLIP captioner" in r.stderr


def test_caption_of_a_missing_image_is_one_line(tmp_path):
    r = fastimagic("caption", str(tmp_path / "missing.jpg"), "--model", "tiny")
    assert r.returncode == 2
    assert "missing.jpg: no such file" in r.stderr


@pytest.mark.parametrize(
    ("fields", "command", "expected"),
    [
        ({"precision": "fp61"}, "validate", "story.yaml:8 precision: unknown precision 'fp61' (did you mean 'fp16'?)"),
        ({"fit": "cropp"}, "validate", "story.yaml:8 fit: unknown mode 'cropp' (did you mean 'crop'?)"),
        ({"precision": "fp16"}, "run", "precision: fp16 is not offered on CPU"),
        ({"precision": "tf32"}, "run", "precision: tf32 is a CUDA matmul mode"),
    ],
)
def test_bad_precision_and_fit_are_one_line_exit_2(tmp_path, photo_bytes, fields, command, expected):
    r = fastimagic(command, str(_board(tmp_path, photo_bytes, **fields)))
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_one_number_resolution_keeps_the_reference_aspect_and_its_long_side_is_capped(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 160), (200, 120, 40)).save(buf, "PNG")
    wide = _board(tmp_path, buf.getvalue(), max_side="128")
    r = fastimagic("run", str(wide))
    assert r.returncode == 2 and "resolution: 64 on a 640x160 reference gives 256x64, over max_side 128" in r.stderr
    assert not (tmp_path / "out").exists()
    ok = _board(tmp_path, buf.getvalue(), fit="pad")
    r = fastimagic("run", str(ok), "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    (manifest,) = (tmp_path / "out").rglob("cli-test/*/manifest.json")
    run = json.loads(manifest.read_text())
    assert run["resolution"] == {"width": 256, "height": 64}
    assert run["reference"]["fit"] == {"mode": "pad", "source_size": [640, 160], "size": [256, 64],
                                       "padding": [0, 0, 0, 0], "pad_colour": [128, 128, 128]}
    assert run["precision"] == {"requested": "auto", "finetune": "fp32", "sampling": ["fp32"]}
    assert all(k["width"] == 256 and k["height"] == 64 for k in run["keyframes"])


def test_a_vae_override_is_loaded_and_named_in_the_identity(tmp_path, photo_bytes):
    from fastimagic import tiny

    tiny.build_components()["vae"].save_pretrained(tmp_path / "vae")
    r = fastimagic("run", str(_board(tmp_path, photo_bytes, vae="./vae")), "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    (manifest,) = (tmp_path / "out").rglob("cli-test/*/manifest.json")
    assert "+vae:folder:vae:" in json.loads(manifest.read_text())["model"]["identity"]
    for command in ("validate", "run"):  # a missing folder is known before any weights load: validate says so
        r = fastimagic(command, str(_board(tmp_path, photo_bytes, vae="./nowhere/vae")))
        assert r.returncode == 2 and "story.yaml:8 vae: ./nowhere/vae: no such folder" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_a_scorer_that_cannot_load_is_refused_before_the_run(tmp_path, photo_bytes):
    path = _board(tmp_path, photo_bytes, scorer="someone/not-a-cached-clip")
    r = fastimagic("run", str(path), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "scorer: someone/not-a-cached-clip is not in the local Hugging Face cache" in r.stderr
    assert not (tmp_path / "out").exists()


def test_version_and_counts_that_read_as_english(tmp_path, photo_bytes):
    from fastimagic import __version__

    r = fastimagic("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fastimagic {__version__}"
    path = _board(tmp_path, photo_bytes)
    path.write_text(path.read_text().replace("forget: [none, encoderattn]", "forget: auto"))
    r = fastimagic("validate", str(path))  # forget: auto renders its second pass only if the first overfits
    assert r.returncode == 0 and "ok: 1 scene, up to 3 keyframes, " in r.stdout, r.stderr


def test_strategies_and_open_print_without_loading_torch_or_prefect(tmp_path, photo_bytes):
    """What makes `strategies` (once its shapes are cached) and `open` of a local run print at once: they import
    neither torch nor Prefect."""
    run_dir = tmp_path / "out" / "story" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text("{}")
    code = (
        "import sys\nfrom flows import cli\n"
        f"assert cli.main(['strategies', '--model', 'sdxl']) == 0\nassert cli.main(['open', {str(run_dir)!r}]) == 0\n"
        "print('loaded:', sorted(m for m in ('torch', 'prefect', 'diffusers') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                           stdin=subprocess.DEVNULL, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    assert runs[0].stdout == runs[1].stdout.replace("loaded: []", "loaded: ['diffusers', 'torch']")
    assert runs[1].stdout.rstrip().endswith(f"{run_dir}/index.html\nloaded: []")
    assert list((tmp_path / "cache" / "fastimagic").glob("unet-shapes-sdxl-diffusers-*.json"))
