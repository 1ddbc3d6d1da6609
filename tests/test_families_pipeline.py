"""A storyboard end to end on tiny-sdxl and tiny-sd2, chosen by ``model:`` alone (local output)."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

STORY = """\
name: Family Day
reference: ref.jpg
model: {model}
resolution: 64x72
source_prompt: a photo of two friends on the beach
finetune: {{steps: 4, min_steps: 4{blocks}}}
defaults:
  seeds: 1
  steps: 3
  edit: {{subtract: {{gamma: [0.9, 1.2]}}}}
scenes:
  - id: walking
    prompt: a photo of two friends walking on the beach
    forget: [none, decoderattn+decoder2]
  - id: dancing
    prompt: a photo of two friends dancing
    forget: auto
    edit: {{project: {{alpha: [0.8], beta: [1.2]}}}}
output: out
"""


@pytest.mark.parametrize("model,family", [("tiny-sdxl", "sdxl"), ("tiny-sd2", "sd2")])
def test_a_storyboard_runs_end_to_end_on_each_family(tmp_path, photo_bytes, model, family):
    from flows.storyboard import storyboard_flow

    (tmp_path / "ref.jpg").write_bytes(photo_bytes)
    (tmp_path / "story.yaml").write_text(STORY.format(model=model, blocks=""))
    first = storyboard_flow(storyboard=str(tmp_path / "story.yaml"))
    manifest = json.loads(open(first["manifest"]).read())
    assert manifest["status"] == "complete"
    assert manifest["model"]["family"] == family and manifest["model"]["identity"] == f"{model}:v1"
    assert {k["forget"] for k in manifest["keyframes"] if k["scene"] == "walking"} == {"none", "decoderattn+decoder2"}
    run = tmp_path / "out" / "family-day" / first["run_id"]
    for k in manifest["keyframes"]:
        assert Image.open(run / k["key"]).size == (64, 72)
    tuning = json.loads((tmp_path / "out" / "tunings" / first["tuning_key"] / "tuning.json").read_text())
    assert tuning["family"] == family

    second = storyboard_flow(storyboard=str(tmp_path / "story.yaml"))
    assert second["tuning_reused"] is True and second["tuning_key"] == first["tuning_key"]
    again = json.loads(open(second["manifest"]).read())
    assert [k["sha256"] for k in again["keyframes"]] == [k["sha256"] for k in manifest["keyframes"]]


def test_a_trained_block_the_model_lacks_is_refused_before_anything_is_written(tmp_path, photo_bytes):
    from fastimagic.errors import InputError
    from flows.run import preflight, read_storyboard

    (tmp_path / "ref.jpg").write_bytes(photo_bytes)
    (tmp_path / "story.yaml").write_text(STORY.format(model="tiny-sdxl", blocks=", trained_blocks: [down_blocks.3]"))
    board = read_storyboard(str(tmp_path / "story.yaml"))
    with pytest.raises(InputError, match=r"finetune.trained_blocks: 'down_blocks.3': SDXL has down_blocks.0 to") as e:
        preflight(board)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model,family", [("tiny-sdxl", "sdxl"), ("tiny-sd2", "sd2")])
def test_on_s3_each_family_runs_resumes_and_reuses_its_tuning(tmp_path, photo_bytes, s3_server, s3_env, model, family):
    """Reference, output and tunings in S3; a run that lost keyframes and its manifests is resumed to the same
    keyframes; a second run reuses the stored tuning (the pooled SDXL vector and the v-prediction model included)."""
    from flows.storyboard import storyboard_flow

    bucket, client = s3_env, s3_server.client()
    client.put_object(Bucket=bucket, Key="refs/ref.jpg", Body=photo_bytes)
    story = STORY.format(model=model, blocks="").replace("reference: ref.jpg", f"reference: s3://{bucket}/refs/ref.jpg")
    story = story.replace("output: out", f"output: s3://{bucket}/out")
    (tmp_path / "story.yaml").write_text(story)

    def get(key):
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    first = storyboard_flow(storyboard=str(tmp_path / "story.yaml"), run_id="r1")
    run = "out/family-day/r1"
    manifest = json.loads(get(f"{run}/manifest.json"))
    assert manifest["status"] == "complete" and manifest["model"]["family"] == family
    assert json.loads(get(f"out/tunings/{first['tuning_key']}/tuning.json"))["family"] == family
    sequence = json.loads(get(f"{run}/sequence.json"))
    assert len(sequence["frames"]) == 2

    # Lose one scene's keyframes (a resume re-renders per scene and seed) and the run's manifests, as a crash
    # mid-run would; the resume renders just those and proves the rest.
    lost = [k["key"] for k in manifest["keyframes"] if k["scene"] == "walking"]
    for key in lost + ["manifest.json", "sequence.json"]:
        client.delete_object(Bucket=bucket, Key=f"{run}/{key}")
    storyboard_flow(storyboard=str(tmp_path / "story.yaml"), run_id="r1", resume=True)
    resumed = json.loads(get(f"{run}/manifest.json"))
    assert resumed["status"] == "complete"
    assert resumed["resumed"]["rendered"] == len(lost)
    assert resumed["resumed"]["kept"] == len(manifest["keyframes"]) - len(lost)
    assert sorted(k["sha256"] for k in resumed["keyframes"]) == sorted(k["sha256"] for k in manifest["keyframes"])
    assert json.loads(get(f"{run}/sequence.json")) == sequence

    second = storyboard_flow(storyboard=str(tmp_path / "story.yaml"))
    assert second["tuning_reused"] is True and second["tuning_key"] == first["tuning_key"]


@pytest.mark.parametrize("kind", ["sdxl-refiner", "inpainting", "sd3", "flux"])
def test_run_refuses_an_unsupported_checkpoint_in_one_line_exit_2_and_writes_nothing(tmp_path, photo_bytes, kind):
    import torch
    from safetensors.torch import save_file
    from test_cli import _board, fastimagic
    from test_models import UNSUPPORTED_CHECKPOINTS

    keys, found = UNSUPPORTED_CHECKPOINTS[kind]
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(tmp_path / f"{kind}.safetensors"))
    board = _board(tmp_path, photo_bytes, model=f"./{kind}.safetensors")
    r = fastimagic("run", str(board))
    assert r.returncode == 2, r.stderr[-2000:]
    [line] = r.stderr.strip().splitlines()
    assert re.search(found, line) and f"{kind}.safetensors" in line
    assert "supports SD 1.x, SD 2.x and SDXL" in line
    assert not (tmp_path / "out").exists()
