"""Picking keyframes and forgetting strategies from scores (the paper's appendix 6.6 workflow as thresholds)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from fastimagic.autoforget import (
    Thresholds,
    auto_forget_decision,
    choose_best,
    forgetting_for_prompt,
    looks_overfitted,
    render_scene,
    summarize,
)
from fastimagic.picking import pick, scene_picks, similarity_key


def record(seed: int, gamma: float, clip: float, fidelity: float, metric: str = "clip_image", forget="none") -> dict:
    return {
        "key": f"scenes/walk/{seed}-g{gamma:.2f}-{forget}.png",
        "scene": "walk",
        "prompt": "a photo of a dog walking",
        "seed": seed,
        "edit": {"mode": "subtract", "gamma": gamma},
        "forget": forget,
        "scores": {"clip": clip, "fidelity": fidelity, "fidelity_metric": metric},
    }


def score(clip: float, fidelity: float, metric: str = "clip_image") -> dict:
    return {"clip": clip, "fidelity": fidelity, "fidelity_metric": metric}


# ---- pick ----


def test_pick_orders_by_clip_score_and_ranks_from_one():
    records = [record(0, 0.9, 24.0, 0.9), record(0, 1.1, 30.0, 0.8), record(1, 0.9, 27.0, 0.85)]
    picks = pick(records)
    assert [p["key"] for p in picks] == [records[1]["key"], records[2]["key"], records[0]["key"]]
    assert [p["rank"] for p in picks] == [1, 2, 3]


def test_pick_takes_the_top_k():
    records = [record(s, 1.0, 20.0 + s, 0.8) for s in range(6)]
    assert [p["seed"] for p in pick(records, top=2)] == [5, 4]
    assert len(pick(records, top=10)) == 6
    with pytest.raises(ValueError, match="top must be at least 1"):
        pick(records, top=0)


def test_pick_breaks_ties_by_fidelity_then_seed_then_edit_order():
    records = [
        record(1, 1.3, 28.0, 0.80),  # same clip, same fidelity, higher seed
        record(0, 1.3, 28.0, 0.80),  # rendered before the next one: the edit order is the records' order
        record(0, 1.1, 28.0, 0.80),
        record(2, 1.2, 28.0, 0.85),  # more similar to the reference: first among the ties
    ]
    picks = pick(records)
    assert [(p["seed"], p["edit"]["gamma"]) for p in picks] == [(2, 1.2), (0, 1.3), (0, 1.1), (1, 1.3)]


def test_pick_ties_on_lpips_prefer_the_lower_distance():
    records = [record(0, 1.0, 28.0, 0.4, "lpips"), record(1, 1.0, 28.0, 0.2, "lpips")]
    assert [p["seed"] for p in pick(records)] == [1, 0]


def test_pick_filters_by_thresholds():
    records = [
        record(0, 1.0, 30.0, 0.95),
        record(1, 1.0, 25.0, 0.80),
        record(2, 1.0, 29.0, 0.70),
        record(3, 1.0, 31.0, 0.15, "lpips"),
        record(4, 1.0, 32.0, 0.45, "lpips"),
    ]
    assert [p["seed"] for p in pick(records, min_clip=28.0)] == [4, 3, 0, 2]
    # max_lpips only concerns LPIPS-scored records; min_fidelity only CLIP-image-scored ones.
    assert [p["seed"] for p in pick(records, max_lpips=0.3)] == [3, 0, 2, 1]
    assert [p["seed"] for p in pick(records, min_fidelity=0.75)] == [4, 3, 0, 1]
    assert [p["seed"] for p in pick(records, min_clip=26.0, max_lpips=0.3, min_fidelity=0.75, top=2)] == [3, 0]
    assert pick(records, min_clip=99.0) == []


def test_pick_is_deterministic_and_leaves_its_input_alone():
    records = [record(s % 3, 0.8 + 0.1 * (s // 3), float(20 + (s * 7) % 5), 0.8) for s in range(12)]
    before = copy.deepcopy(records)
    first, second = pick(records, top=5), pick(records, top=5)
    assert first == second
    assert records == before
    assert all("rank" not in r for r in records)


def test_pick_refuses_unscored_records():
    unscored = record(0, 1.0, 20.0, 0.8)
    del unscored["scores"]
    with pytest.raises(ValueError, match=r"scenes/walk/0-g1.00-none.png: no clip, fidelity, fidelity_metric"):
        pick([unscored])


# ---- overfitting ----


def test_looks_overfitted_needs_both_reconstruction_and_low_text_alignment():
    reconstructs = [score(24.0, 0.95), score(25.5, 0.93)]
    assert looks_overfitted(reconstructs, clip_threshold=27.0, fidelity_threshold=0.9)
    assert not looks_overfitted(reconstructs, clip_threshold=25.0, fidelity_threshold=0.9)  # best clip 25.5 passes
    drifted = [score(24.0, 0.70), score(25.5, 0.75)]
    assert not looks_overfitted(drifted, clip_threshold=27.0, fidelity_threshold=0.9)


def test_looks_overfitted_reads_lpips_as_a_distance():
    assert looks_overfitted([score(22.0, 0.10, "lpips"), score(23.0, 0.15, "lpips")], clip_threshold=27.0)
    assert not looks_overfitted([score(22.0, 0.45, "lpips"), score(23.0, 0.50, "lpips")], clip_threshold=27.0)


def test_default_thresholds_are_one_set():
    t = Thresholds()
    assert (t.clip, t.clip_image, t.lpips) == (27.0, 0.9, 0.2)
    assert 25.0 <= t.clip <= 28.0 and t.fidelity("clip_image") == 0.9 and t.fidelity("lpips") == 0.2


def test_auto_forget_overfitted_chooses_strategies_from_the_prompt():
    first_pass = [score(22.0, 0.96), score(24.0, 0.94), score(23.0, 0.92)]
    decision = auto_forget_decision(first_pass, "a photo of a dog jumping")
    assert decision["overfitted"] is True
    assert decision["strategies"] == ["encoderattn"]
    assert decision["scores"] == {
        "count": 3,
        "best_clip": 24.0,
        "fidelity_metric": "clip_image",
        "best_fidelity": 0.96,
        "mean_fidelity": pytest.approx(0.94),
    }
    assert decision["edit_words"] == {"structure": ["jumping"], "appearance": []}
    assert "re-render with encoderattn" in decision["reason"] and "jumping" in decision["reason"]
    assert auto_forget_decision(first_pass, "a photo of a cat made of gold")["strategies"] == ["decoderattn"]
    both = auto_forget_decision(first_pass, "a photo of a red dog jumping")
    assert both["strategies"] == ["encoderattn", "decoderattn"]


def test_auto_forget_not_overfitted_means_no_rerender():
    good = auto_forget_decision([score(29.0, 0.93), score(26.0, 0.95)], "a photo of a dog jumping")
    assert good["overfitted"] is False and good["strategies"] == []
    assert good["reason"].startswith("not overfitted: the best CLIP score 29.00 reaches 27")
    drifted = auto_forget_decision([score(20.0, 0.6), score(21.0, 0.5)], "a photo of a dog jumping")
    assert drifted["overfitted"] is False and drifted["strategies"] == []
    assert "forgetting would not help" in drifted["reason"]


def test_auto_forget_takes_thresholds_as_a_dict_and_records_them():
    first_pass = [score(28.0, 0.12, "lpips")]
    decision = auto_forget_decision(first_pass, "a dog jumping", {"clip": 30.0, "lpips": 0.15})
    assert decision["overfitted"] is True
    assert decision["thresholds"] == {"clip": 30.0, "clip_image": Thresholds().clip_image, "lpips": 0.15}
    assert "mean lpips 0.120 <= 0.15" in decision["reason"]


def test_mixed_fidelity_metrics_are_refused():
    with pytest.raises(ValueError, match="mix fidelity metrics"):
        summarize([score(20.0, 0.9), score(20.0, 0.1, "lpips")])


# ---- forgetting for a prompt ----


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a dog jumping", ["encoderattn"]),
        ("A photo of a bird spreading its wings, side view", ["encoderattn"]),
        ("a photo of a man sitting", ["encoderattn"]),
        ("a cat lying on its back", ["encoderattn"]),
        ("a person raising a hand", ["encoderattn"]),
        ("a red car", ["decoderattn"]),
        ("a cat made of gold", ["decoderattn"]),
        ("a photo of a horse at night", ["decoderattn"]),
        ("a dog wearing a hat", ["decoderattn"]),
        ("a painting of a house in the style of van gogh", ["decoderattn"]),
        ("a red dog jumping", ["encoderattn", "decoderattn"]),
        ("a photo of a dog", ["encoderattn", "decoderattn"]),
    ],
)
def test_forgetting_for_prompt(prompt, expected):
    assert forgetting_for_prompt(prompt) == expected


# ---- choosing among re-renders ----


def test_choose_best_takes_the_highest_best_clip_score():
    candidates = {
        "none": [score(24.0, 0.95), score(25.0, 0.94)],
        "encoderattn": [score(26.0, 0.85), score(29.5, 0.80)],
        "decoderattn": [score(28.0, 0.88)],
    }
    assert choose_best(candidates) == "encoderattn"


def test_choose_best_breaks_ties_by_fidelity_then_order():
    tied = {"encoderattn": [score(28.0, 0.80)], "decoderattn": [score(28.0, 0.86)]}
    assert choose_best(tied) == "decoderattn"
    lpips = {"encoderattn": [score(28.0, 0.30, "lpips")], "decoderattn": [score(28.0, 0.40, "lpips")]}
    assert choose_best(lpips) == "encoderattn"
    same = {"decoderattn": [score(28.0, 0.8)], "encoderattn": [score(28.0, 0.8)]}
    assert choose_best(same) == "decoderattn"


def test_choose_best_accepts_records_and_ignores_empty_strategies():
    candidates = {"encoderattn": [], "decoderattn": [record(0, 1.1, 27.0, 0.8, forget="decoderattn")]}
    assert choose_best(candidates) == "decoderattn"
    with pytest.raises(ValueError, match="no candidates"):
        choose_best({"encoderattn": []})


def test_similarity_key_knows_each_metrics_direction():
    assert similarity_key("clip_image", 0.95) > similarity_key("clip_image", 0.80)
    assert similarity_key("lpips", 0.10) > similarity_key("lpips", 0.30)
    with pytest.raises(ValueError, match="unknown fidelity metric"):
        similarity_key("ssim", 0.1)


def test_selection_does_not_import_torch():
    code = "import sys, fastimagic.autoforget, fastimagic.picking; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- render -> decide -> re-render, once per scene ----


class Renders:
    """A stand-in renderer: records which strategies were asked for and scores each keyframe from a table."""

    def __init__(self, scores: dict[str, tuple[float, float]]):
        self.scores, self.calls = scores, []

    def __call__(self, strategies: tuple[str, ...]) -> list[dict]:
        self.calls.append(strategies)
        return [record(seed, 1.0, *self.scores[name], forget=name) for name in strategies for seed in (0, 1)]


def test_render_scene_with_a_list_renders_once_without_deciding():
    render = Renders({"none": (24.0, 0.95), "encoder": (25.0, 0.9)})
    records, decision = render_scene(("none", "encoder"), "a dog jumping", Thresholds(), render)
    assert render.calls == [("none", "encoder")] and decision is None and len(records) == 4


def test_render_scene_auto_rerenders_an_overfitted_scene_and_keeps_the_best_strategy():
    render = Renders({"none": (22.0, 0.96), "encoderattn": (29.0, 0.8)})
    records, decision = render_scene(("auto",), "a photo of a dog jumping", Thresholds(), render)
    assert render.calls == [("none",), ("encoderattn",)]
    assert decision["overfitted"] and decision["chosen"] == "encoderattn"
    assert [r["forget"] for r in records] == ["none", "none", "encoderattn", "encoderattn"]
    assert decision["reason"].endswith(
        "re-render with encoderattn for a structure edit (jumping); chose encoderattn: encoderattn scored best (best"
        " CLIP score 29.00 against none 22.00)")


def test_auto_says_why_it_keeps_the_first_pass_when_the_re_render_scores_worse():
    """The log line and the manifest's reason agree with ``chosen``: the re-render was tried and lost."""
    render = Renders({"none": (22.0, 0.96), "encoderattn": (21.0, 0.8)})
    _, decision = render_scene(("auto",), "a photo of a dog jumping", Thresholds(), render)
    assert decision["chosen"] == "none"
    assert decision["reason"].endswith("; chose none: the re-render did not beat the first pass (best CLIP score"
                                       " 22.00 against encoderattn 21.00)")


def test_render_scene_auto_keeps_a_scene_that_does_not_overfit():
    render = Renders({"none": (30.0, 0.96)})
    records, decision = render_scene(("auto",), "a photo of a dog jumping", Thresholds(clip=27.0), render)
    assert render.calls == [("none",)] and decision["chosen"] == "none" and not decision["overfitted"]


def test_scene_picks_come_from_the_chosen_strategy_only():
    class Select:
        top, min_clip, max_lpips, min_fidelity = 2, None, None, None

    records = [record(0, 1.0, 31.0, 0.9, forget="none"), record(0, 1.0, 29.0, 0.8, forget="encoderattn"),
               record(1, 1.0, 28.0, 0.8, forget="encoderattn")]
    assert [p["forget"] for p in scene_picks(records, Select(), chosen="encoderattn")] == ["encoderattn"] * 2
    assert scene_picks(records, Select())[0]["forget"] == "none"
    assert scene_picks(records, None) == []
