"""The storyboard schema: what loads, what it becomes, and the one-line message for every kind of mistake."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from fastimagic import forgetting
from fastimagic.config import slugify
from fastimagic.errors import InputError
from fastimagic.merge import Project, Subtract
from fastimagic.storyboard import Edit, Scene, Storyboard
from fastimagic.storyboard_yaml import StoryboardError, load_storyboard

GAMMAS = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5)
HEAD = "name: demo\nreference: ref.png\n"  # two lines, so a scene list starting after it begins on line 3


def _yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def load(tmp_path: Path, text: str) -> Storyboard:
    path = tmp_path / "story.yaml"
    path.write_text(_yaml(text))
    return load_storyboard(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    """The problem lines, with the temporary folder cut so they read ``story.yaml:LINE ...``."""
    with pytest.raises(StoryboardError) as info:
        load(tmp_path, text)
    return [line.replace(f"{tmp_path}{os.sep}", "") for line in info.value.problems]


def one_problem(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


def scene_problem(tmp_path: Path, scene: str) -> str:
    """The one problem of a storyboard whose only scene (line 4 on) is ``scene``, a YAML flow mapping body."""
    return one_problem(tmp_path, HEAD + "scenes:\n  - {id: a, prompt: p, " + scene + "}\n")


# --- what a valid storyboard becomes --------------------------------------------------------------------------


def test_minimal_storyboard_gets_the_documented_defaults(tmp_path):
    board = load(tmp_path, HEAD + "scenes:\n  - {id: walk, prompt: a dog walking}\n")
    assert board.name == "demo" and board.slug == "demo"
    assert board.reference.given == "ref.png"
    assert board.reference.resolved == str(tmp_path / "ref.png")
    assert board.output.given == "./keyframes" and board.output.resolved == str(tmp_path / "keyframes")
    assert (board.model.kind, board.model.resolved) == ("tiny", "tiny")
    assert board.model_config_source is None
    assert board.resolution is None and board.vae is None  # the model's own side: size_for(..., model_side)
    assert board.size_for((1200, 800), 512) == (768, 512)  # the shorter side, the reference's aspect kept
    assert board.source_prompt is None
    assert (board.max_seeds, board.max_keyframes, board.max_side, board.allow_pickle) == (64, 10000, 2048, False)
    ft = board.finetune
    assert (ft.steps, ft.batch_size, ft.min_steps, ft.loss_threshold) == (40, 10, 36, 0.03)
    assert (ft.text_lr, ft.unet_lr, ft.trained_blocks, ft.seed, ft.gradient_checkpointing) == (
        1e-3,
        6e-5,
        "reference",
        0,
        False,
    )
    assert (board.fit, board.precision) == ("crop", "auto")
    assert (board.caption.num_beams, board.caption.max_new_tokens) == (1, None)
    (scene,) = board.scenes
    assert scene.seeds == (0, 1)
    assert scene.edit.mode == "subtract" and scene.edit.subtract.gamma == GAMMAS
    assert scene.forget == ("none",)
    assert (scene.sigma, scene.guidance, scene.steps, scene.negative_prompt) == (0.0, 7.5, 50, None)
    assert board.keyframe_count() == 2 * 8 * 1


def test_source_text_and_source_are_kept_as_given(tmp_path):
    text = HEAD + "# a comment the manifest keeps\nscenes: [{id: a, prompt: p}]\n"
    path = tmp_path / "story.yaml"
    path.write_text(text)
    board = load_storyboard(path)
    assert board.source_text == text
    assert board.source == str(path)


def test_defaults_are_inherited_and_a_scene_value_wins_with_edit_replaced_whole(tmp_path):
    board = load(
        tmp_path,
        """
        name: demo
        reference: ref.png
        defaults:
          seeds: 4
          forget: [encoderattn, decoderattn]
          guidance: 5
          negative_prompt: blurry
          edit: {project: {alpha: [1.0, 1.2], beta: [0.0, 0.5]}}
        scenes:
          - id: run
            prompt: a dog running
          - id: sit
            prompt: a dog sitting
            seeds: [7, 42]
            guidance: 9.5
            edit: {subtract: {gamma: 1.1}}
        """,
    )
    run, sit = board.scenes
    assert run.seeds == (0, 1, 2, 3) and run.forget == ("encoderattn", "decoderattn") and run.guidance == 5.0
    assert run.negative_prompt == "blurry" and sit.negative_prompt == "blurry"
    assert run.edit.combos() == [Project(1.0, 0.0), Project(1.0, 0.5), Project(1.2, 0.0), Project(1.2, 0.5)]
    assert sit.seeds == (7, 42) and sit.guidance == 9.5 and sit.forget == ("encoderattn", "decoderattn")
    assert sit.edit.project is None and sit.edit.combos() == [Subtract(1.1)]
    assert run.keyframe_count() == 4 * 4 * 2 and sit.keyframe_count() == 2 * 1 * 2
    assert board.keyframe_count() == 32 + 4


def test_models_are_frozen(tmp_path):
    board = load(tmp_path, HEAD + "scenes: [{id: a, prompt: p}]\n")
    with pytest.raises(ValidationError):
        board.name = "other"
    with pytest.raises(ValidationError):
        board.scenes[0].prompt = "other"


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) would read 1e-3 as the text "1e-3"; people write learning rates like this.
    board = load(tmp_path, HEAD + "finetune: {text_lr: 1e-3, unet_lr: 6e-5}\nscenes: [{id: a, prompt: p}]\n")
    assert (board.finetune.text_lr, board.finetune.unet_lr) == (1e-3, 6e-5)


def test_anchors_and_merge_keys_work_and_lines_point_at_the_written_value(tmp_path):
    text = """
        name: demo
        reference: ref.png
        scenes:
          - &base
            id: a
            prompt: p
            guidance: 0
          - <<: *base
            id: b
        """
    assert problems(tmp_path, text) == [
        "story.yaml:7 scenes[0].guidance: must be at least 1 (got 0)",
        "story.yaml:7 scenes[1].guidance: must be at least 1 (got 0)",
    ]


# --- reporting ------------------------------------------------------------------------------------------------


def test_the_message_names_file_line_and_field_path(tmp_path):
    text = """
        name: demo
        reference: ref.png
        scenes:
          - id: one
            prompt: p
          - id: two
            prompt: p
          - id: three
            prompt: p
            seeds: 1
            guidance: 7
            steps: 30
            sigma: 0.1
            forget: encoderatn
        """
    assert one_problem(tmp_path, text) == (
        "story.yaml:14 scenes[2].forget: unknown strategy 'encoderatn' (did you mean 'encoderattn'?)"
    )


def test_every_problem_is_reported_at_once_in_line_order(tmp_path):
    text = """
        name: demo
        reference: s3://bucket
        resolution: 100x64
        finetune:
          stepz: 3
        defaults:
          promt: x
        scenes:
          - id: Beach Walk
            prompt: ""
          - id: two
            prompt: p
            forget: [encoder, nope]
            edit: {subtract: {gamma: [0.8, .nan, "1.2"]}}
        """
    assert problems(tmp_path, text) == [
        "story.yaml:2 reference: s3 URI 's3://bucket' names no key; write s3://bucket/path/to/file",
        "story.yaml:3 resolution: 100x64: width 100 is not a multiple of 8 (try 96 or 104)",
        "story.yaml:5 finetune.stepz: unknown key 'stepz' (did you mean 'steps'?)",
        "story.yaml:7 defaults.promt: unknown key 'promt' (did you mean 'prompt'?)",
        "story.yaml:9 scenes[0].id: scene id 'Beach Walk' must be a slug like 'beach-walk'",
        "story.yaml:10 scenes[0].prompt: must not be empty",
        "story.yaml:13 scenes[1].forget[1]: unknown strategy 'nope' (did you mean 'none'?)",
        "story.yaml:14 scenes[1].edit.subtract.gamma[1]: must be a finite number (got nan)",
        "story.yaml:14 scenes[1].edit.subtract.gamma[2]: must be a number (got '1.2')",
    ]


def test_storyboard_error_carries_lines_and_survives_pickling(tmp_path):
    with pytest.raises(StoryboardError) as info:
        load(tmp_path, "name: demo\nscenes: []\n")
    err = info.value
    assert isinstance(err, InputError)
    assert len(err.problems) == 2 and str(err) == "\n".join(err.problems)
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems and str(again) == str(err)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(StoryboardError) as info:
        load_storyboard(tmp_path / "nope.yaml")
    assert info.value.problems[0].startswith(f"{tmp_path / 'nope.yaml'}: cannot read the storyboard")


# --- YAML itself ----------------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line(tmp_path):
    text = HEAD + "scenes:\n  - id: a\n    prompt: a: b\n"
    assert one_problem(tmp_path, text) == "story.yaml:5: YAML syntax error: mapping values are not allowed here"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: a\n\nb: \x00\n", "story.yaml:3: YAML syntax error: unacceptable character #x0000"),
        ("a: " + "[" * 3000 + "]" * 3000 + "\n", "story.yaml:1: the YAML is nested too deeply"),
        ("a: 1\n---\nb: 2\n", "story.yaml:2: YAML syntax error: but found another document"),
    ],
)
def test_unreadable_yaml_is_one_line(tmp_path, text, expected):
    assert one_problem(tmp_path, text).startswith(expected)


def test_python_tags_are_refused_and_nothing_is_constructed(tmp_path):
    marker = tmp_path / "ran"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\nreference: ref.png\nscenes: []\n"
    assert one_problem(tmp_path, text) == (
        "story.yaml:1: YAML tag '!!python/object/apply:os.system' is not allowed (plain YAML only)"
    )
    assert not marker.exists()


def test_custom_tags_are_refused_too(tmp_path):
    text = HEAD + "scenes:\n  - {id: !scene a, prompt: p}\n"
    assert one_problem(tmp_path, text) == "story.yaml:4: YAML tag '!scene' is not allowed (plain YAML only)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "story.yaml:1: the storyboard must be a mapping of settings (got a list)"),
        ("just text\n", "story.yaml:1: the storyboard must be a mapping of settings (got 'just text')"),
        ("", "story.yaml:1: the storyboard is empty; it needs name, reference and scenes"),
    ],
)
def test_the_top_level_must_be_a_mapping(tmp_path, text, expected):
    assert one_problem(tmp_path, text) == expected


def test_duplicate_mapping_keys_are_errors(tmp_path):
    text = """
        name: demo
        reference: ref.png
        name: again
        scenes:
          - id: a
            prompt: p
            prompt: q
        """
    assert problems(tmp_path, text) == [
        "story.yaml:3 name: duplicate key 'name' (first at line 1)",
        "story.yaml:7 scenes[0].prompt: duplicate key 'prompt' (first at line 6)",
    ]


def test_alias_bombs_are_refused(tmp_path):
    rows = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdef", "bcdefg"):
        rows.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
    found = one_problem(tmp_path, "\n".join(rows) + "\n")
    assert found.startswith("story.yaml:1: expands to more than")


# --- top level ------------------------------------------------------------------------------------------------


def test_required_top_level_fields(tmp_path):
    assert problems(tmp_path, "model: tiny\n") == [
        "story.yaml:1 name: is required",
        "story.yaml:1 reference: is required",
        "story.yaml:1 scenes: is required: list at least one scene, each with an id and a prompt",
    ]


def test_unknown_top_level_key_suggests_the_right_one(tmp_path):
    text = "name: demo\nreference: ref.png\nscene: [{id: a, prompt: p}]\nscenes: [{id: a, prompt: p}]\n"
    assert one_problem(tmp_path, text) == "story.yaml:3 scene: unknown key 'scene' (did you mean 'scenes'?)"


def test_unknown_key_without_a_close_match_lists_the_allowed_ones(tmp_path):
    found = one_problem(tmp_path, HEAD + "finetune: {zzz: 1}\nscenes: [{id: a, prompt: p}]\n")
    assert found.startswith("story.yaml:3 finetune.zzz: unknown key 'zzz'; allowed here: steps, batch_size,")


@pytest.mark.parametrize(
    ("name", "slug"), [("Beach Day!", "beach-day"), ("Café au lait", "cafe-au-lait"), ("run_2", "run_2")]
)
def test_name_is_kept_and_its_slug_names_the_run_folder(tmp_path, name, slug):
    board = load(tmp_path, f"name: '{name}'\nreference: ref.png\nscenes: [{{id: a, prompt: p}}]\n")
    assert board.name == name and board.slug == slug


def test_name_without_letters_or_digits_is_an_error(tmp_path):
    found = one_problem(tmp_path, "name: '!!!'\nreference: ref.png\nscenes: [{id: a, prompt: p}]\n")
    assert found == "story.yaml:1 name: name '!!!' needs letters or digits: its slug names the run's folder"


def test_source_prompt_is_optional_but_not_blank(tmp_path):
    board = load(tmp_path, HEAD + "source_prompt: a photo of a dog\nscenes: [{id: a, prompt: p}]\n")
    assert board.source_prompt == "a photo of a dog"
    found = one_problem(tmp_path, HEAD + "source_prompt: ' '\nscenes: [{id: a, prompt: p}]\n")
    assert found == (
        "story.yaml:3 source_prompt: must not be empty; leave it out to caption the reference image with BLIP"
    )


# --- resolution -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "size"), [("768x512", (768, 512)), ("512", 512), ("64X64", (64, 64))])
def test_resolution_is_one_side_or_width_x_height(tmp_path, value, size):
    board = load(tmp_path, HEAD + f"resolution: {value}\nscenes: [{{id: a, prompt: p}}]\n")
    assert board.resolution == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "100x100",
            "100x100: width 100 is not a multiple of 8 (try 96 or 104);"
            " height 100 is not a multiple of 8 (try 96 or 104)",
        ),
        ("4096", "4096x4096: side 4096 is more than max_side 2048 (raise max_side if you mean it)"),
        ("32x512", "32x512: width 32 is less than 64"),
        ("big", "must be a size like 512 or '768x512' (got 'big')"),
        ("512.0", "must be a size like 512 or '768x512' (got 512.0)"),
    ],
)
def test_bad_resolutions(tmp_path, value, message):
    found = one_problem(tmp_path, HEAD + f"resolution: {value}\nscenes: [{{id: a, prompt: p}}]\n")
    assert found == f"story.yaml:3 resolution: {message}"


def test_max_side_raises_the_resolution_cap(tmp_path):
    board = load(tmp_path, HEAD + "max_side: 4096\nresolution: 4096x2048\nscenes: [{id: a, prompt: p}]\n")
    assert board.resolution == (4096, 2048)


# --- paths and models -----------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_storyboard_folder_not_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "boards"
    folder.mkdir()
    (folder / "story.yaml").write_text(
        "name: demo\nreference: ../photos/dog.jpg\noutput: out\nmodel: ./models/sd\nscenes: [{id: a, prompt: p}]\n"
    )
    monkeypatch.chdir(tmp_path)
    board = load_storyboard(Path("boards/story.yaml"))
    assert board.reference.given == "../photos/dog.jpg"
    assert board.reference.resolved == str(tmp_path / "photos" / "dog.jpg")
    assert board.output.resolved == str(folder / "out")
    assert (board.model.kind, board.model.resolved) == ("folder", str(folder / "models" / "sd"))


def test_home_and_absolute_paths_are_kept_absolute(tmp_path):
    board = load(tmp_path, "name: demo\nreference: ~/dog.jpg\noutput: /data/out\nscenes: [{id: a, prompt: p}]\n")
    assert board.reference.resolved == os.path.expanduser("~/dog.jpg")
    assert board.output.resolved == "/data/out"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("''", "must not be empty"),
        ("s3://", "s3 URI 's3://': missing bucket name; write s3://BUCKET/KEY"),
        ("s3:///key.png", "s3 URI 's3:///key.png': missing bucket name; write s3://BUCKET/KEY"),
        ("s3://bucket", "s3 URI 's3://bucket' names no key; write s3://bucket/path/to/file"),
        ("s3://bucket/", "s3 URI 's3://bucket/' names no key; write s3://bucket/path/to/file"),
        ("https://x.org/a.png", "'https://x.org/a.png': only local paths and s3:// URIs are supported"),
        ("[a.png]", "must be a path or an s3:// URI (got a list)"),
    ],
)
def test_bad_references(tmp_path, value, message):
    found = one_problem(tmp_path, f"name: demo\nreference: {value}\nscenes: [{{id: a, prompt: p}}]\n")
    assert found == f"story.yaml:2 reference: {message}"


def test_s3_reference_and_output_are_kept(tmp_path):
    board = load(
        tmp_path, "name: demo\nreference: s3://photos/dogs/a.jpg\noutput: s3://frames\nscenes: [{id: a, prompt: p}]\n"
    )
    assert board.reference.resolved == "s3://photos/dogs/a.jpg"
    assert board.output.resolved == "s3://frames"


def test_a_storyboard_read_from_s3_resolves_relative_paths_in_its_s3_folder():
    text = "name: demo\nreference: ../photos/dog.jpg\nscenes: [{id: a, prompt: p}]\n"
    board = load_storyboard("s3://work/boards/story.yaml", text=text)
    assert board.reference.resolved == "s3://work/photos/dog.jpg"
    assert board.output.resolved == "s3://work/boards/keyframes"
    assert board.source == "s3://work/boards/story.yaml" and board.source_text == text


def test_s3_relative_paths_cannot_climb_out_of_the_bucket():
    text = "name: demo\nreference: ../../dog.jpg\nscenes: [{id: a, prompt: p}]\n"
    with pytest.raises(StoryboardError) as info:
        load_storyboard("s3://work/boards/story.yaml", text=text)
    assert info.value.problems == [
        "s3://work/boards/story.yaml:2 reference: '../../dog.jpg' climbs out of the bucket (relative to s3://work/boards)"
    ]


def test_overrides_replace_top_level_fields_and_are_named_in_messages(tmp_path):
    path = tmp_path / "story.yaml"
    path.write_text(HEAD + "output: here\nscenes: [{id: a, prompt: p}]\n")
    board = load_storyboard(path, overrides={"output": "s3://frames/run", "model": "org/sd"})
    assert board.output.resolved == "s3://frames/run" and board.model.kind == "hub"
    assert board.source_text == path.read_text()
    with pytest.raises(StoryboardError) as info:
        load_storyboard(path, overrides={"output": "s3://"})
    assert info.value.problems == [f"{path}: overridden output: s3 URI 's3://': missing bucket name; write s3://BUCKET/KEY"]


def test_an_s3_storyboard_needs_its_text():
    with pytest.raises(StoryboardError, match="pass it as text="):
        load_storyboard("s3://work/story.yaml")


def test_model_sources(tmp_path):
    (tmp_path / "local-sd").mkdir()
    cases = {
        "tiny": ("tiny", "tiny"),
        "stable-diffusion-v1-5/stable-diffusion-v1-5": ("hub", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        "local-sd": ("folder", str(tmp_path / "local-sd")),  # no ./ but it exists next to the storyboard
        "./other": ("folder", str(tmp_path / "other")),
        "models/rv.safetensors": ("single_file", str(tmp_path / "models" / "rv.safetensors")),
    }
    for given, (kind, resolved) in cases.items():
        board = load(tmp_path, HEAD + f"model: {given}\nscenes: [{{id: a, prompt: p}}]\n")
        assert (board.model.given, board.model.kind, board.model.resolved) == (given, kind, resolved)


@pytest.mark.parametrize("name", ["old.ckpt", "old.pt", "old.bin", "old.pth"])
def test_pickle_checkpoints_need_allow_pickle(tmp_path, name):
    found = one_problem(tmp_path, HEAD + f"model: {name}\nscenes: [{{id: a, prompt: p}}]\n")
    assert found == "story.yaml:3 model: pickle checkpoints can run code; set allow_pickle: true to load it anyway"
    board = load(tmp_path, HEAD + f"allow_pickle: true\nmodel: {name}\nscenes: [{{id: a, prompt: p}}]\n")
    assert board.model.kind == "single_file" and board.allow_pickle


def test_model_that_is_neither_hub_id_nor_path(tmp_path):
    found = one_problem(tmp_path, HEAD + "model: stable diffusion\nscenes: [{id: a, prompt: p}]\n")
    assert found == (
        "story.yaml:3 model: 'stable diffusion' is not a hub repo id like 'org/name', a local path"
        " (start it with ./ or /), a .safetensors checkpoint or 'tiny'"
    )


def test_model_config_goes_with_single_file_checkpoints(tmp_path):
    text = HEAD + "model: rv.safetensors\nmodel_config: ./sd15\nscenes: [{id: a, prompt: p}]\n"
    board = load(tmp_path, text)
    assert (board.model_config_source.kind, board.model_config_source.resolved) == ("folder", str(tmp_path / "sd15"))
    found = one_problem(tmp_path, HEAD + "model: org/sd\nmodel_config: org/sd\nscenes: [{id: a, prompt: p}]\n")
    assert found == (
        "story.yaml:4 model_config: only applies when model is a single-file checkpoint (.safetensors); remove it"
    )


# --- finetune -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("steps: 0", "finetune.steps: must be at least 1 (got 0)"),
        ("batch_size: 65", "finetune.batch_size: must be at most 64 (got 65)"),
        ("text_lr: 0", "finetune.text_lr: must be more than 0 (got 0)"),
        ("unet_lr: .inf", "finetune.unet_lr: must be a finite number (got inf)"),
        ("loss_threshold: -1.0", "finetune.loss_threshold: must be at least 0 (got -1.0)"),
        ("steps: 2.5", "finetune.steps: must be a whole number (got 2.5)"),
        ("seed: '3'", "finetune.seed: must be a whole number (got '3')"),
        ("gradient_checkpointing: maybe", "finetune.gradient_checkpointing: must be true or false (got 'maybe')"),
        ("trained_blocks: papr", "finetune.trained_blocks: unknown preset 'papr' (did you mean 'paper'?); use refer"),
        ("trained_blocks: [down_block.0]", "finetune.trained_blocks[0]: unknown UNet block 'down_block.0'"),
        ("trained_blocks: [up_blocks.4]", "finetune.trained_blocks[0]: 'up_blocks.4': SD 1.x and 2.x have up_blocks.0"),
    ],
)
def test_bad_finetune_settings(tmp_path, setting, message):
    found = one_problem(tmp_path, HEAD + f"finetune: {{{setting}}}\nscenes: [{{id: a, prompt: p}}]\n")
    assert found.startswith(f"story.yaml:3 {message}")


def test_finetune_settings_and_explicit_blocks(tmp_path):
    text = HEAD + "finetune: {steps: 60, trained_blocks: [down_blocks.0, up_blocks.1], gradient_checkpointing: yes}\n"
    board = load(tmp_path, text + "scenes: [{id: a, prompt: p}]\n")
    assert board.finetune.steps == 60 and board.finetune.gradient_checkpointing is True
    assert board.finetune.trained_blocks == ("down_blocks.0", "up_blocks.1")


# --- scenes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("Beach Walk", "scene id 'Beach Walk' must be a slug like 'beach-walk'"),
        ("../etc", "scene id '../etc' must be a slug like 'etc'"),
        ("a/b", "scene id 'a/b' must be a slug like 'a-b'"),
        ("Crème", "scene id 'Crème' must be a slug like 'creme'"),
        ("-x", "scene id '-x' must be a slug like 'x'"),
        ("日本", "scene id '日本' must be a slug: lowercase a-z, 0-9, '-' and '_', starting with a letter or digit"),
        ("12", "scene id must be text like 'beach-walk' (got 12)"),
    ],
)
def test_scene_ids_must_be_slugs(tmp_path, given, message):
    found = one_problem(tmp_path, HEAD + f"scenes:\n  - id: {given}\n    prompt: p\n")
    assert found == f"story.yaml:4 scenes[0].id: {message}"


def test_long_ids_are_refused_and_64_characters_are_fine(tmp_path):
    assert load(tmp_path, HEAD + f"scenes: [{{id: {'a' * 64}, prompt: p}}]\n").scenes[0].id == "a" * 64
    assert "must be a slug" in one_problem(tmp_path, HEAD + f"scenes: [{{id: {'a' * 65}, prompt: p}}]\n")


def test_duplicate_scene_ids_point_at_the_second(tmp_path):
    text = HEAD + "scenes:\n  - id: a\n    prompt: p\n  - id: b\n    prompt: p\n  - id: a\n    prompt: q\n"
    assert one_problem(tmp_path, text) == "story.yaml:8 scenes[2].id: scene id 'a' is already used by scenes[0]"


@pytest.mark.parametrize(
    ("scenes", "message"),
    [
        ("[]", "story.yaml:3 scenes: list at least one scene"),
        ("{id: a}", "story.yaml:3 scenes: must be a list of scenes (got a mapping)"),
        ("[walk]", "story.yaml:3 scenes[0]: a scene must be a mapping with an id and a prompt (got 'walk')"),
        ("[{id: a}]", "story.yaml:3 scenes[0].prompt: is required"),
        ("[{prompt: p}]", "story.yaml:3 scenes[0].id: is required"),
        (
            "[{id: a, prompt: 7}]",
            "story.yaml:3 scenes[0].prompt: must be text (got 7); put it in quotes to mean the text",
        ),
    ],
)
def test_scene_list_shape(tmp_path, scenes, message):
    assert one_problem(tmp_path, HEAD + f"scenes: {scenes}\n") == message


def test_a_misspelt_key_is_one_problem_not_also_a_missing_field(tmp_path):
    text = HEAD + "scenes:\n  - id: a\n    promt: p\n  - id: b\n    negative: x\n"
    assert problems(tmp_path, text) == [
        "story.yaml:5 scenes[0].promt: unknown key 'promt' (did you mean 'prompt'?)",
        "story.yaml:6 scenes[1].prompt: is required",
        "story.yaml:7 scenes[1].negative: unknown key 'negative' (did you mean 'negative_prompt'?)",
    ]


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("guidance: 0.5", "guidance: must be at least 1 (got 0.5)"),
        ("guidance: 31", "guidance: must be at most 30 (got 31)"),
        ("guidance: high", "guidance: must be a number (got 'high')"),
        ("guidance: .nan", "guidance: must be a finite number (got nan)"),
        ("sigma: 1.5", "sigma: must be at most 1 (got 1.5)"),
        ("sigma: -0.1", "sigma: must be at least 0 (got -0.1)"),
        ("steps: 0", "steps: must be at least 1 (got 0)"),
        ("steps: 1001", "steps: must be at most 1000 (got 1001)"),
        ("negative_prompt: 3", "negative_prompt: must be text (got 3); put it in quotes to mean the text"),
    ],
)
def test_bad_scene_numbers(tmp_path, field, message):
    assert scene_problem(tmp_path, field) == f"story.yaml:4 scenes[0].{message}"


def test_scene_numbers_and_negative_prompt(tmp_path):
    board = load(
        tmp_path, HEAD + "scenes: [{id: a, prompt: p, sigma: 0.2, guidance: 12, steps: 20, negative_prompt: x}]\n"
    )
    scene = board.scenes[0]
    assert (scene.sigma, scene.guidance, scene.steps, scene.negative_prompt) == (0.2, 12.0, 20, "x")


# --- seeds ----------------------------------------------------------------------------------------------------


def test_seeds_count_or_list(tmp_path):
    board = load(tmp_path, HEAD + "scenes: [{id: a, prompt: p, seeds: 3}, {id: b, prompt: p, seeds: [7, 42, 0]}]\n")
    assert board.scenes[0].seeds == (0, 1, 2) and board.scenes[1].seeds == (7, 42, 0)


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ("0", "seeds: must be at least 1 seed (got 0)"),
        ("-3", "seeds: must be at least 1 seed (got -3)"),
        (
            "1000000",
            "seeds: 1000000 seeds is more than max_seeds (64); raise max_seeds at the top level if you mean it",
        ),
        ("true", "seeds: must be a count like 4 or a list of seeds like [0, 7, 42] (got true)"),
        ("2.0", "seeds: must be a count like 4 or a list of seeds like [0, 7, 42] (got 2.0)"),
        ("[]", "seeds: list at least one seed"),
        ("[1, 2, 1]", "seeds[2]: seed 1 is listed twice"),
        ("[1, -2]", "seeds[1]: a seed must be a whole number from 0 to 4294967295 (got -2)"),
        ("[1, x]", "seeds[1]: a seed must be a whole number from 0 to 4294967295 (got 'x')"),
    ],
)
def test_bad_seeds(tmp_path, seeds, message):
    assert scene_problem(tmp_path, f"seeds: {seeds}") == f"story.yaml:4 scenes[0].{message}"


def test_max_seeds_is_configurable(tmp_path):
    board = load(tmp_path, HEAD + "max_seeds: 100\nscenes: [{id: a, prompt: p, seeds: 100}]\n")
    assert len(board.scenes[0].seeds) == 100
    found = one_problem(tmp_path, HEAD + "max_seeds: 2\nscenes: [{id: a, prompt: p, seeds: [4, 5, 6]}]\n")
    assert found == (
        "story.yaml:4 scenes[0].seeds: 3 seeds is more than max_seeds (2);"
        " raise max_seeds at the top level if you mean it"
    )


# --- edits ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gamma", "values"),
    [
        ("{from: 0.8, to: 1.5, step: 0.1}", GAMMAS),
        ("{from: 0, to: 1, step: 0.25}", (0.0, 0.25, 0.5, 0.75, 1.0)),
        ("{from: 0.8, to: 1.5, step: 0.3}", (0.8, 1.1, 1.4)),
        ("{from: 1.0, to: 1.0, step: 0.1}", (1.0,)),
        ("[1.2, 0.9]", (1.2, 0.9)),
        ("1.1", (1.1,)),
        ("[0.123456789]", (0.123457,)),
    ],
)
def test_gamma_lists_and_inclusive_ranges(tmp_path, gamma, values):
    board = load(tmp_path, HEAD + f"scenes: [{{id: a, prompt: p, edit: {{subtract: {{gamma: {gamma}}}}}}}]\n")
    assert board.scenes[0].edit.subtract.gamma == values


def test_range_end_within_tolerance_is_included():
    edit = Edit.model_validate({"subtract": {"gamma": {"from": 0.1, "to": 0.3 - 1e-12, "step": 0.1}}})
    assert edit.subtract.gamma == (0.1, 0.2, 0.3)


def test_projection_combos_are_the_cartesian_product(tmp_path):
    board = load(
        tmp_path,
        HEAD
        + "scenes: [{id: a, prompt: p, edit: {project: {alpha: {from: 1, to: 1.2, step: 0.1}, beta: [0, -0.5]}}}]\n",
    )
    combos = board.scenes[0].edit.combos()
    assert [(c.alpha, c.beta) for c in combos] == [
        (1.0, 0.0),
        (1.0, -0.5),
        (1.1, 0.0),
        (1.1, -0.5),
        (1.2, 0.0),
        (1.2, -0.5),
    ]
    assert {c.mode for c in combos} == {"project"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("{}", "edit: choose subtract: {gamma: ...} or project: {alpha: ..., beta: ...}"),
        ("{subtract: {gamma: 1}, project: {alpha: 1, beta: 1}}", "edit: choose one of subtract or project, not both"),
        ("{subtract: }", "edit.subtract: needs gamma"),
        ("{subtrct: {gamma: 1}}", "edit.subtrct: unknown key 'subtrct' (did you mean 'subtract'?)"),
        ("{subtract: {gama: 1}}", "edit.subtract.gama: unknown key 'gama' (did you mean 'gamma'?)"),
        ("{project: {alpha: 1}}", "edit.project.beta: is required"),
        ("{subtract: {gamma: []}}", "edit.subtract.gamma: list at least one value"),
        ("{subtract: {gamma: [1, .inf]}}", "edit.subtract.gamma[1]: must be a finite number (got inf)"),
        ("{subtract: {gamma: [1, true]}}", "edit.subtract.gamma[1]: must be a number (got true)"),
        ("{subtract: {gamma: [1.0, 1]}}", "edit.subtract.gamma[1]: value 1.0 is listed twice"),
        ("{subtract: {gamma: 'x'}}", "edit.subtract.gamma: must be a number, a list of numbers or a range like"),
        ("{subtract: {gamma: {from: 1, to: 2}}}", "edit.subtract.gamma: a range needs 'step'"),
        ("{subtract: {gamma: {from: 1, to: 2, stp: 1, step: 1}}}", "edit.subtract.gamma.stp: unknown key 'stp'"),
        ("{subtract: {gamma: {from: 1, to: 2, step: 0}}}", "edit.subtract.gamma.step: must be more than 0 (got 0)"),
        ("{subtract: {gamma: {from: 1, to: .nan, step: 1}}}", "edit.subtract.gamma.to: must be a finite number"),
        ("{subtract: {gamma: {from: 2, to: 1, step: 0.1}}}", "edit.subtract.gamma: the range goes down"),
        ("{subtract: {gamma: {from: 0, to: 1, step: 1e-9}}}", "edit.subtract.gamma: the range makes more than"),
        ("subtract", "edit: must be a mapping of settings (got 'subtract')"),
    ],
)
def test_bad_edits(tmp_path, edit, message):
    assert scene_problem(tmp_path, f"edit: {edit}").startswith(f"story.yaml:4 scenes[0].{message}")


# --- forgetting -----------------------------------------------------------------------------------------------


def test_strategy_names_come_from_the_forgetting_module():
    assert (
        tuple(forgetting.STRATEGIES)
        == (
            "none",
            "encoder",
            "decoder",
            "encoderattn",
            "decoderattn",
            "encoderkv",
            "decoderkv",
            "encoderattn+encoder1",
            "decoderattn+decoder2",
        )
    )
    assert Scene(id="a", prompt="p", forget=list(forgetting.ALIASES)).forget == tuple(forgetting.ALIASES.values())


def test_forget_takes_a_name_or_a_list_and_aliases_become_canonical(tmp_path):
    text = HEAD + "scenes:\n  - {id: a, prompt: p, forget: donotforget}\n"
    text += "  - {id: b, prompt: p, forget: [noencoder, nodecoder, encoderattn+encoder1]}\n"
    a, b = load(tmp_path, text).scenes
    assert a.forget == ("none",)
    assert b.forget == ("encoder", "decoder", "encoderattn+encoder1")


@pytest.mark.parametrize(
    ("forget", "message"),
    [
        ("decoderatn", "forget: unknown strategy 'decoderatn' (did you mean 'decoderattn'?)"),
        ("Encoder", "forget: unknown strategy 'Encoder' (did you mean 'encoder'?)"),
        ("[none, xyzzy]", "forget[1]: unknown strategy 'xyzzy'; valid: none, encoder, decoder, encoderattn,"),
        ("[encoder, noencoder]", "forget[1]: strategy 'encoder' is listed twice ('noencoder' means 'encoder')"),
        ("[]", "forget: list at least one strategy"),
        ("[none, 3]", "forget[1]: must be a strategy name (got 3)"),
        ("{a: 1}", "forget: must be a strategy name or a list of them (got a mapping)"),
    ],
)
def test_bad_forget(tmp_path, forget, message):
    assert scene_problem(tmp_path, f"forget: {forget}").startswith(f"story.yaml:4 scenes[0].{message}")


# --- defaults and totals --------------------------------------------------------------------------------------


def test_a_bad_default_is_reported_once_under_defaults(tmp_path):
    text = HEAD + "defaults:\n  guidance: 99\n  id: x\nscenes:\n  - {id: a, prompt: p}\n  - {id: b, prompt: p}\n"
    assert problems(tmp_path, text) == [
        "story.yaml:4 defaults.guidance: must be at most 30 (got 99)",
        "story.yaml:5 defaults.id: a default id makes no sense; give each scene its own",
    ]


def test_defaults_must_be_a_mapping(tmp_path):
    text = HEAD + "defaults: [seeds]\nscenes: [{id: a, prompt: p}]\n"
    assert one_problem(tmp_path, text) == "story.yaml:3 defaults: must be a mapping of scene fields (got a list)"


def test_total_keyframes_over_the_cap(tmp_path):
    text = HEAD + "max_keyframes: 100\nscenes:\n  - {id: small, prompt: p}\n  - {id: big, prompt: p, seeds: 10}\n"
    assert load(tmp_path, text).keyframe_count() == 16 + 80
    found = one_problem(tmp_path, text.replace("seeds: 10", "seeds: 12, forget: [none, encoder]"))
    assert found == (
        "story.yaml:4 scenes: the storyboard makes 208 keyframes, more than max_keyframes (100); the largest scene,"
        " 'big', makes 192 (12 seeds x 8 edits x 2 forget strategies). Render fewer, or raise max_keyframes"
    )


def test_the_total_is_checked_even_when_another_scene_is_broken(tmp_path):
    # (scenes after the one that goes over the cap are not read: counting stops there, nothing more is expanded)
    text = HEAD + "max_keyframes: 10\nscenes:\n  - {id: b}\n  - {id: a, prompt: p, seeds: 2}\n"
    assert problems(tmp_path, text) == [
        "story.yaml:4 scenes: the storyboard makes 16 keyframes, more than max_keyframes (10); the largest scene,"
        " 'a', makes 16 (2 seeds x 8 edits x 1 forget strategies). Render fewer, or raise max_keyframes",
        "story.yaml:5 scenes[0].prompt: is required",
    ]


# --- the library side -----------------------------------------------------------------------------------------


def test_a_storyboard_built_in_python_merges_defaults_and_keeps_scene_objects():
    ready = Scene(id="b", prompt="q")
    board = Storyboard(name="x", reference="/r.png", defaults={"seeds": 3}, scenes=[{"id": "a", "prompt": "p"}, ready])
    assert board.scenes[0].seeds == (0, 1, 2) and board.scenes[1] is ready
    with pytest.raises(ValidationError, match="list at least one scene"):
        Storyboard(name="x", reference="/r.png", scenes=[])


def test_scene_models_validate_on_their_own():
    scene = Scene(id="a", prompt="p", seeds=3, forget="noencoder")
    assert scene.seeds == (0, 1, 2) and scene.forget == ("encoder",) and scene.keyframe_count() == 24


def test_slugify():
    assert slugify("Beach Walk") == "beach-walk"
    assert slugify("  --Hello__World--  ") == "hello__world"
    assert slugify("x" * 100) == "x" * 64


def test_importing_the_schema_does_not_import_prefect():
    code = "import sys, fastimagic.storyboard_yaml; sys.exit('prefect' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_validating_a_storyboard_does_not_import_torch(tmp_path):
    """`fastimagic validate` stays fast: the schema must not pull in torch, diffusers or prefect."""
    import subprocess
    import sys

    code = (
        "import sys, fastimagic.storyboard_yaml;"
        "print(sorted(m for m in ('torch', 'diffusers', 'prefect') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_select_auto_and_scorer_fields(tmp_path):
    board = load(
        tmp_path,
        HEAD
        + "scorer: auto\ndefaults: {select: {top: 3, min_clip: 20}}\n"
        + "scenes:\n  - {id: a, prompt: p, forget: auto, auto: {clip: 30}}\n  - {id: b, prompt: q}\n",
    )
    a, b = board.scenes
    assert a.auto_forget and a.forget == ("auto",) and a.auto.clip == 30 and a.auto.clip_image == 0.9
    assert a.select.top == 3 and b.select.min_clip == 20 and not b.auto_forget
    assert board.scorer_name == "tiny"  # auto follows the model: tiny here
    assert a.keyframe_count() == 3 * b.keyframe_count()  # auto may render up to three passes


@pytest.mark.parametrize(
    "scene,message",
    [
        ("{id: a, prompt: p, forget: [auto, none]}", "scenes[0].forget: 'auto' chooses the strategies itself"),
        ("{id: a, prompt: p, select: {top: 0}}", "scenes[0].select.top"),
        ("{id: a, prompt: p, select: {tpo: 1}}", "did you mean 'top'"),
        ("{id: a, prompt: p, auto: {clip: .nan}}", "scenes[0].auto.clip"),
    ],
)
def test_bad_select_and_auto(tmp_path, scene, message):
    with pytest.raises(StoryboardError) as e:
        load(tmp_path, HEAD + f"scenes:\n  - {scene}\n")
    assert message in str(e.value)


def test_scorer_values(tmp_path):
    assert load(tmp_path, HEAD + "scorer: none\nscenes: [{id: a, prompt: p}]\n").scorer_name is None
    hub = load(tmp_path, HEAD + "scorer: openai/clip-vit-base-patch32\nscenes: [{id: a, prompt: p}]\n")
    assert hub.scorer_name == "openai/clip-vit-base-patch32"
    with pytest.raises(StoryboardError, match="scorer"):
        load(tmp_path, HEAD + "scorer: model.ckpt\nscenes: [{id: a, prompt: p}]\n")
