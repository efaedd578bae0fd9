"""The caption scorer: right on every image the demo dataset renders, at chance on noise,
and wrong where an image contradicts its caption."""

import dataclasses

import numpy as np
import pytest

from fluxflow_jax.data.demo import COLOURS, POSITIONS, DemoSource, render
from fluxflow_jax.evaluation import demo_scorer


@pytest.mark.parametrize("size, ratios", [(32, (1.0,)), (64, (0.5, 1.0, 1.5))])
def test_every_rendered_image_shows_its_caption(size, ratios):
    source = DemoSource(length=250, image_size=size, aspect_ratios=ratios)
    scenes = [source.scene(i) for i in range(len(source))]
    assert any(len(s.background) == 2 for s in scenes)  # two-tone backgrounds are covered
    accuracy = demo_scorer.accuracy([render(s) for s in scenes], scenes)
    assert accuracy == {"background": 1.0, "shape_colour": 1.0, "position": 1.0}


def test_noise_scores_near_chance():
    source = DemoSource(length=300, image_size=32)
    scenes = [source.scene(i) for i in range(len(source))]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in scenes]
    accuracy, chance = demo_scorer.accuracy(noise, scenes), demo_scorer.chance(scenes)
    for name in demo_scorer.ATTRIBUTES:
        assert accuracy[name] < chance[name] + 0.08, (name, accuracy, chance)


def test_chance_is_one_guess_among_the_datasets_choices():
    source = DemoSource(length=50, image_size=32)
    scenes = [source.scene(i) for i in range(len(source))]
    two_tone = sum(len(s.background) == 2 for s in scenes) / len(scenes)
    chance = demo_scorer.chance(scenes)
    assert chance["shape_colour"] == 1 / 12 and chance["position"] == 1 / 9
    assert chance["background"] == pytest.approx((1 - two_tone) / 12 + two_tone / 144)


def test_an_image_of_another_scene_fails_exactly_what_differs():
    scene = DemoSource(length=200, image_size=64).scene(7)
    colour = next(c for c in COLOURS if c not in (scene.colour, *scene.background))
    where = next(p for p in POSITIONS if p != scene.position)
    variants = {"background": dataclasses.replace(scene, background=(colour,)),
                "shape_colour": dataclasses.replace(scene, colour=colour),
                "position": dataclasses.replace(scene, position=where)}
    for changed, other in variants.items():
        scores = demo_scorer.score(render(other), scene)
        # Moving or recolouring the shape also moves where its colour is found.
        wrong = {name for name, right in scores.items() if not right}
        assert changed in wrong, (changed, scores)
        assert "background" not in wrong or changed == "background", (changed, scores)
