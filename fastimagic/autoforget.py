"""When to forget (paper §3.4 and appendix 6.6): the paper's by-eye workflow as thresholds on scores.

:mod:`fastimagic.forgetting` says *which* learned weights each strategy puts back; this module says *when*, for a
scene written ``forget: auto``:

1. render the scene without forgetting;
2. if its keyframes reconstruct the reference but ignore the prompt (:func:`looks_overfitted`, over the scores of
   :mod:`fastimagic.scoring`), render it again with ``encoderattn`` for structure, pose and action edits,
   ``decoderattn`` for appearance and texture edits, both when the prompt does not decide
   (:func:`forgetting_for_prompt`);
3. keep the strategy whose best keyframe scores best (:func:`choose_best`).

:func:`render_scene` is those three steps around a ``render`` callable, so the same code runs in a notebook and in
the orchestrated flow. The paper notes the human decisions "can also be replaced by thresholds on metrics like CLIP
score and LPIPS score": :class:`Thresholds` holds the one set, and the storyboard's ``auto:`` field is that class.

Pure Python (no torch).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict

from fastimagic.picking import one_metric, scores_of, similarity_key

AUTO = "auto"  # forget: auto

_Float = Annotated[float, Strict()]


class Thresholds(BaseModel):
    """When a scene counts as overfitted: its best CLIP score is under ``clip`` while its keyframes stay close to the
    reference (mean CLIP image similarity at least ``clip_image``, or mean LPIPS at most ``lpips``).

    Starting points for SD 1.x keyframes scored with CLIP ViT-L/14 (CLIP score = 100 * cosine) and LPIPS-AlexNet;
    calibrate them on your own references. An unedited reconstruction of a photo scores about 0.9-0.97 CLIP image
    similarity and under 0.2 LPIPS against it, a successful edit of the same subject about 0.75-0.88 and 0.3-0.6;
    images that match their prompt score about 27-33 CLIP score, ones that ignore the edit words a few points less.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    clip: Annotated[_Float, Field(ge=0, le=100)] = 27.0
    clip_image: Annotated[_Float, Field(ge=-1, le=1)] = 0.9
    lpips: Annotated[_Float, Field(ge=0)] = 0.2

    def fidelity(self, metric: str) -> float:
        """The threshold for fidelity ``metric`` (``clip_image`` or ``lpips``)."""
        similarity_key(metric, 0.0)
        return float(getattr(self, metric))


ENCODER_STRATEGY = "encoderattn"
DECODER_STRATEGY = "decoderattn"

# Edits of structure, pose, action, position and viewpoint: the UNet encoder (down_blocks) holds these, so the
# paper forgets its learned attention (encoderattn). Verbs are given in their base form; their -s/-ed/-ing forms
# are matched too (see _inflections).
STRUCTURE_VERBS = """
jump sit run raise lift dance stand lie lay walk turn hold kneel squat lean stretch bend crouch fly swim climb ride
kick throw catch hug kiss point reach crawl fall push pull open close eat drink play fight sleep look
rotate tilt spin roll skate ski surf bark yawn chase carry grab sprint hop leap jog march stride pose
""".split()
# Irregular past forms, and -ing forms of verbs whose base form is mostly a noun in prompts ("waves", "a bow").
STRUCTURE_FORMS = """
sat ran stood lain flew flown rode ridden held fell fought slept ate eaten drank threw caught waving bowing facing
""".split()
STRUCTURE_WORDS = """
pose posture position upright sideways backwards profile view viewpoint angle aerial overhead closeup
""".split()
STRUCTURE_PHRASES = (
    "from above",
    "from below",
    "from behind",
    "from the side",
    "side view",
    "top view",
    "front view",
    "back view",
    "rear view",
    "bird's eye",
    "birds eye",
    "close up",
    "upside down",
    "next to",
    "in front of",
    "on top of",
    "on its back",
    "on his back",
    "on her back",
    "with its mouth open",
    "arms crossed",
    "crossed arms",
)

# Edits of appearance, colour, texture, material, style, lighting and weather: the UNet decoder (up_blocks) holds
# these, so the paper forgets its learned attention (decoderattn).
COLOUR_WORDS = """
red orange yellow green blue purple violet pink brown black white gray grey golden silver beige turquoise cyan
magenta teal maroon navy crimson colorful colourful colored coloured monochrome rainbow pastel
""".split()
MATERIAL_WORDS = """
gold wood wooden metal metallic steel iron bronze copper glass crystal stone marble plastic paper cardboard clay
ice lego origami porcelain ceramic fur furry wool woolen knitted crochet leather velvet silk cotton chocolate
""".split()
STYLE_WORDS = """
painting painted drawing drawn sketch cartoon anime watercolor watercolour oil pencil style styled impressionist
cubist surreal pixel vintage retro sepia illustration sculpture statue toy plush
""".split()
TEXTURE_WORDS = """
texture textured striped stripes spotted spots dotted polka plaid checkered shiny glossy matte rusty fluffy hairy
bald wet muddy dirty tattoo tattooed
""".split()
CLOTHING_WORDS = """
wearing wears wear dressed hat cap dress shirt jacket coat glasses sunglasses scarf tie costume crown helmet
sweater hoodie uniform suit bowtie necklace
""".split()
LIGHTING_WORDS = """
night sunset sunrise dusk dawn snow snowy rain rainy fog foggy mist misty lighting lit neon dark bright glowing
autumn winter moonlight candlelight
""".split()
APPEARANCE_PHRASES = ("made of", "made out of", "at night", "in the style of", "black and white")
APPEARANCE_WORDS = COLOUR_WORDS + MATERIAL_WORDS + STYLE_WORDS + TEXTURE_WORDS + CLOTHING_WORDS + LIGHTING_WORDS


def _inflections(verb: str) -> set[str]:
    """``verb`` with its -s, -ed and -ing forms (over-generation is harmless: the extra forms are not words)."""
    forms = {verb, verb + "s", verb + "es", verb + "ed", verb + "d", verb + "ing"}
    if verb.endswith("ie"):
        forms.add(verb[:-2] + "ying")  # lie -> lying
    elif verb.endswith("e"):
        forms.add(verb[:-1] + "ing")  # dance -> dancing
    if re.fullmatch(r"[a-z]*[^aeiou][aeiou][^aeiouwxy]", verb):
        forms |= {verb + verb[-1] + "ing", verb + verb[-1] + "ed"}  # sit -> sitting, hop -> hopped
    return forms


_STRUCTURE_SET = {f for v in STRUCTURE_VERBS for f in _inflections(v)} | set(STRUCTURE_FORMS) | set(STRUCTURE_WORDS)
_APPEARANCE_SET = set(APPEARANCE_WORDS)


def edit_words(prompt: str) -> tuple[list[str], list[str]]:
    """The words and phrases of ``prompt`` that name a structure edit and an appearance edit, in prompt order."""
    words = re.findall(r"[a-z]+(?:'[a-z]+)?", prompt.lower().replace("-", " "))
    padded = " " + " ".join(words) + " "
    structure = [w for w in words if w in _STRUCTURE_SET]
    structure += [p for p in STRUCTURE_PHRASES if f" {p} " in padded]
    appearance = [w for w in words if w in _APPEARANCE_SET]
    appearance += [p for p in APPEARANCE_PHRASES if f" {p} " in padded]
    return structure, appearance


def forgetting_for_prompt(prompt: str) -> list[str]:
    """The paper's rule: ``["encoderattn"]`` for structure/pose/action/viewpoint edits, ``["decoderattn"]`` for
    appearance/texture/colour/material/style edits, both (encoder first) when the prompt names both or neither.

    >>> forgetting_for_prompt("a dog jumping"), forgetting_for_prompt("a cat made of gold")
    (['encoderattn'], ['decoderattn'])
    """
    structure, appearance = edit_words(prompt)
    if structure and not appearance:
        return [ENCODER_STRATEGY]
    if appearance and not structure:
        return [DECODER_STRATEGY]
    return [ENCODER_STRATEGY, DECODER_STRATEGY]


def summarize(scores: Sequence[Mapping]) -> dict:
    """``{"count", "best_clip", "fidelity_metric", "best_fidelity", "mean_fidelity"}`` of a scene's candidates.

    ``best_fidelity`` is the value most similar to the reference (the max for clip_image, the min for lpips).
    """
    if not scores:
        raise ValueError("no candidates to summarise")
    scores = [scores_of(s) for s in scores]
    metric = one_metric(scores)
    values = [float(s["fidelity"]) for s in scores]
    return {
        "count": len(scores),
        "best_clip": max(float(s["clip"]) for s in scores),
        "fidelity_metric": metric,
        "best_fidelity": max(values, key=lambda v: similarity_key(metric, v)),
        "mean_fidelity": sum(values) / len(values),
    }


def _reconstructs(metric: str, mean_fidelity: float, threshold: float) -> bool:
    return similarity_key(metric, mean_fidelity) >= similarity_key(metric, threshold)


def looks_overfitted(
    scores: Sequence[Mapping],
    *,
    clip_threshold: float | None = None,
    fidelity_threshold: float | None = None,
) -> bool:
    """True when a scene's candidates reconstruct the reference but ignore the prompt.

    That is: their *mean* fidelity is at or past ``fidelity_threshold`` in the metric's direction (CLIP image
    similarity >= it, or LPIPS <= it) **and** even the best candidate's CLIP score stays under ``clip_threshold``.
    Either threshold left out is :class:`Thresholds`' default (for the metric the scores carry).
    ``scores``: score dicts or keyframe records carrying them.
    """
    summary = summarize(scores)
    metric = summary["fidelity_metric"]
    if fidelity_threshold is None:
        fidelity_threshold = Thresholds().fidelity(metric)
    if clip_threshold is None:
        clip_threshold = Thresholds().clip
    return summary["best_clip"] < clip_threshold and _reconstructs(metric, summary["mean_fidelity"], fidelity_threshold)


def auto_forget_decision(
    first_pass_scores: Sequence[Mapping], prompt: str, thresholds: Thresholds | Mapping | None = None
) -> dict:
    """Decide, from the scores of a scene rendered without forgetting, whether and how to render it again.

    Returns ``{"overfitted", "scores" (see :func:`summarize`), "strategies" (empty when not overfitted, else
    :func:`forgetting_for_prompt`), "edit_words" ({"structure", "appearance"}), "thresholds", "reason"}``, a
    plain dict for the run manifest. ``thresholds``: a :class:`Thresholds` or a dict of its fields.
    """
    if thresholds is None:
        thresholds = Thresholds()
    elif isinstance(thresholds, Mapping):
        thresholds = Thresholds.model_validate(thresholds)
    summary = summarize(first_pass_scores)
    metric = summary["fidelity_metric"]
    fidelity_threshold = thresholds.fidelity(metric)
    overfitted = looks_overfitted(
        first_pass_scores, clip_threshold=thresholds.clip, fidelity_threshold=fidelity_threshold
    )
    structure, appearance = edit_words(prompt)
    relation = ">=" if similarity_key(metric, 1.0) > 0 else "<="
    clip_text = f"best CLIP score {summary['best_clip']:.2f}"
    fidelity_text = f"mean {metric} {summary['mean_fidelity']:.3f}"
    strategies: list[str] = []
    if overfitted:
        strategies = forgetting_for_prompt(prompt)
        if strategies == [ENCODER_STRATEGY]:
            why = f"a structure edit ({', '.join(structure)})"
        elif strategies == [DECODER_STRATEGY]:
            why = f"an appearance edit ({', '.join(appearance)})"
        elif structure:
            why = f"both structure ({', '.join(structure)}) and appearance ({', '.join(appearance)}) words"
        else:
            why = "no structure or appearance word decides it"
        reason = (
            f"overfitted: the keyframes reconstruct the reference ({fidelity_text} {relation} {fidelity_threshold:g})"
            f" but ignore the prompt ({clip_text} < {thresholds.clip:g}); re-render with {' and '.join(strategies)}"
            f" for {why}"
        )
    elif summary["best_clip"] >= thresholds.clip:
        reason = f"not overfitted: the {clip_text} reaches {thresholds.clip:g}; keep the keyframes without forgetting"
    else:
        reason = (
            f"not overfitted: the {clip_text} is under {thresholds.clip:g} but the keyframes do not reconstruct the"
            f" reference ({fidelity_text}, threshold {fidelity_threshold:g}); forgetting would not help"
        )
    return {
        "overfitted": overfitted,
        "scores": summary,
        "strategies": strategies,
        "edit_words": {"structure": structure, "appearance": appearance},
        "thresholds": thresholds.model_dump(),
        "reason": reason,
    }


def _best_candidate_key(scores: Sequence[Mapping]) -> tuple[float, float]:
    # (best CLIP score, similarity of the candidate that has it): compared across strategies.
    metric = one_metric(scores)
    best = max(scores, key=lambda s: (float(s["clip"]), similarity_key(metric, s["fidelity"])))
    return float(best["clip"]), similarity_key(metric, best["fidelity"])


def choose_best(candidates_by_strategy: Mapping[str, Sequence[Mapping]]) -> str:
    """The forgetting strategy whose candidates score best: the highest best-candidate CLIP score, ties broken by
    that candidate's fidelity, then by the order of ``candidates_by_strategy`` (first wins).

    Values are lists of score dicts or keyframe records carrying them; include ``"none"`` (the first pass) to let
    it win. Strategies with no candidates are ignored. All candidates must share one fidelity metric.
    """
    scored = {name: [scores_of(c) for c in cands] for name, cands in candidates_by_strategy.items() if cands}
    if not scored:
        raise ValueError("no candidates to choose a forgetting strategy from")
    one_metric([s for cands in scored.values() for s in cands])
    keys = {name: _best_candidate_key(cands) for name, cands in scored.items()}
    order = list(scored)
    return min(order, key=lambda name: (-keys[name][0], -keys[name][1], order.index(name)))


def render_scene(
    forget: Sequence[str],
    prompt: str,
    thresholds: Thresholds,
    render: Callable[[tuple[str, ...]], list[dict]],
) -> tuple[list[dict], dict | None]:
    """Render one scene under its forgetting choice: ``(keyframe records, the auto decision or None)``.

    ``render(strategies)`` renders every keyframe of the scene under each strategy and returns their records
    (carrying ``scores`` for ``forget: auto``). A list of strategies renders once. ``("auto",)`` renders without
    forgetting, decides with :func:`auto_forget_decision`, renders again with the strategies it names if the scene
    overfits, and records the strategy :func:`choose_best` keeps as the decision's ``chosen``.
    """
    if tuple(forget) != (AUTO,):
        return render(tuple(forget)), None
    first = render(("none",))
    decision = auto_forget_decision(first, prompt, thresholds)
    decision["chosen"] = "none"
    if not decision["strategies"]:
        return first, decision
    strategies = tuple(decision["strategies"])
    again = render(strategies)
    by_strategy = {"none": first} | {name: [r for r in again if r["forget"] == name] for name in strategies}
    chosen = decision["chosen"] = choose_best(by_strategy)
    # The reason ends with the outcome, so that what it says and what is recorded as chosen agree.
    best = {name: max(float(scores_of(r)["clip"]) for r in recs) for name, recs in by_strategy.items() if recs}
    against = ", ".join(f"{name} {clip:.2f}" for name, clip in best.items() if name != chosen)
    outcome = "the re-render did not beat the first pass" if chosen == "none" else f"{chosen} scored best"
    decision["reason"] += f"; chose {chosen}: {outcome} (best CLIP score {best[chosen]:.2f} against {against})"
    return first + again, decision
