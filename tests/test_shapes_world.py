"""The shapes world: determinism, prompt structure, rendering, perturbations, and the oracle's accuracy."""

import json
import os
import random

import numpy as np
import pytest

from spatialscore.data.clauses import evaluate
from spatialscore.data.oracle import detect, judge
from spatialscore.data.pairs import PairSpec, make_pair, make_pairs
from spatialscore.data.perturb import PERTURBATIONS, applicable, make_rejected
from spatialscore.data.prompts import TAGS, longest_chain, make_prompts
from spatialscore.data.render import render, render_labels
from spatialscore.data.scene import Obj, Scene, sample_scene, sample_shade, scene_detections
from spatialscore.data.vocab import COLORS, PERTURBATION_KINDS, RELATIONS, SHAPES
from spatialscore.errors import SpatialScoreError


def test_prompts_are_deterministic_and_cover_every_tag():
    a, b = make_prompts(300, seed=7), make_prompts(300, seed=7)
    assert a == b and a != make_prompts(300, seed=8)
    assert {p["tag"] for p in a} == set(TAGS)


def test_long_prompts_have_3_to_5_objects_and_2_to_4_relations():
    for p in make_prompts(200, seed=1, style="long"):
        rels = [e["position"] for e in p["include"] if "position" in e]
        assert 3 <= len(p["include"]) <= 5 and 2 <= len(rels) <= 4
        assert all(r in RELATIONS and 0 <= i < len(p["include"]) for r, i in rels)
        assert len({(e["class"], e["color"]) for e in p["include"]}) == len(p["include"])


def test_long_prompts_avoid_chains_too_tall_for_the_canvas():
    assert longest_chain([(1, "above", 0), (2, "above", 1), (3, "above", 2)]) == 3
    assert longest_chain([(1, "above", 0), (2, "below", 0), (3, "left of", 2)]) == 2
    assert longest_chain([(1, "left of", 0), (2, "right of", 1)]) == 1
    rng = random.Random(0)
    for meta in make_prompts(300, seed=5, style="long"):
        sample_scene(meta, rng)  # raises when the layout cannot be placed


def test_heldout_phrasings_differ_from_train():
    train = {p["prompt"] for p in make_prompts(300, 0, "short", "train")}
    heldout = make_prompts(300, 0, "short", "heldout")
    assert not any(p["prompt"] in train for p in heldout)
    assert not any(w in p["prompt"] for p in heldout for w in (" to the left of ", "an image of", "there is "))


@pytest.mark.parametrize("size", [64, 128, (200, 96)])
def test_render_any_size(size):
    scene = sample_scene(make_prompts(1, seed=3, style="long")[0], random.Random(0))
    img = render(scene, size)
    assert img.size == ((size, size) if isinstance(size, int) else size) and img.mode == "RGB"
    assert np.asarray(img).std() > 5  # something was drawn


def test_faithful_scenes_satisfy_their_prompt_exactly():
    rng = random.Random(0)
    for meta in make_prompts(300, seed=2):
        assert evaluate(meta, scene_detections(sample_scene(meta, rng))).passed, meta["prompt"]


@pytest.mark.parametrize("kind", PERTURBATION_KINDS)
def test_each_perturbation_breaks_the_prompt(kind):
    assert set(PERTURBATIONS) == set(PERTURBATION_KINDS)
    rng, made = random.Random(1), 0
    for meta in make_prompts(200, seed=3):
        if kind not in applicable(meta):
            continue
        scene = sample_scene(meta, rng)
        rejected = make_rejected(scene, meta, [kind], rng)
        if rejected is not None:
            made += 1
            assert not evaluate(meta, scene_detections(rejected)).passed
            assert rejected.to_dict() != scene.to_dict()
    assert made >= 10


def test_pairs_do_not_depend_on_worker_count(tmp_path):
    spec = PairSpec(seed=4)
    one = make_pairs(tmp_path / "a", 12, spec, workers=1, progress=False).read_text()
    two = make_pairs(tmp_path / "b", 12, spec, workers=2, progress=False).read_text()
    assert one == two
    records = [json.loads(line) for line in one.splitlines()]
    assert [r["id"] for r in records] == [f"{i:06d}" for i in range(12)]
    assert all((tmp_path / "a" / r["chosen"]).is_file() and (tmp_path / "a" / r["rejected"]).is_file() for r in records)
    assert all(r["perturbation"]["n"] == len(r["perturbation"]["kinds"]) in (1, 2, 3) for r in records)


@pytest.mark.parametrize("shape", SHAPES)
def test_oracle_shapes_and_colours(shape):
    rng = random.Random(shape)
    for color in COLORS:
        for _ in range(3):
            obj = Obj(shape, color, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.12, 0.2),
                      rng.uniform(-15, 15), sample_shade(color, rng))
            found = [(d.cls, d.color) for d in detect(render(Scene([obj]), 128), ocr=False)]
            assert found == [(shape, color)]


def test_oracle_accepts_faithful_and_detects_perturbed():
    """The acceptance check at small scale: >= 99.5% of faithful scenes pass, >= 99% of rejected ones fail."""
    n = 120
    faithful = sum(judge(render(sample_scene(m, random.Random(i))), m).passed
                   for i, m in enumerate(make_prompts(n, seed=11, phrasing="all")))
    detected = 0
    for i in range(n):
        record, _, rejected = make_pair(i, PairSpec(seed=12))
        detected += not judge(rejected, record["meta"]).passed
    assert faithful / n >= 0.99 and detected / n >= 0.98, (faithful, detected)


def test_ocr_leaves_the_environment_alone(monkeypatch):
    """tesseract runs with OMP_THREAD_LIMIT=1; set in our own environment it stalled torch in later child processes."""
    monkeypatch.delenv("OMP_THREAD_LIMIT", raising=False)
    meta = {"prompt": 'a sign that says "MOON"', "tag": "text", "include": [{"class": "sign", "count": 1}],
            "text": ["MOON"]}
    assert judge(render(sample_scene(meta, random.Random(0))), meta).passed
    assert "OMP_THREAD_LIMIT" not in os.environ


def test_object_scale_grows_objects_and_keeps_the_scene_faithful():
    import random

    from spatialscore.data.oracle import judge
    from spatialscore.data.prompts import PromptWriter
    from spatialscore.data.render import render, render_labels
    from spatialscore.data.scene import sample_scene

    meta = PromptWriter(random.Random(3)).sample("short", {"position": 1})
    small = sample_scene(meta, random.Random(7))
    big = sample_scene(meta, random.Random(7), scale=1.5)
    assert [round(o.size * 1.5, 6) for o in small.objects] == [round(o.size, 6) for o in big.objects]
    assert judge(render(big, 64), meta).passed


def test_centred_composition_frames_relation_scenes_and_keeps_them_faithful():
    """composition="centred": a relation scene is the free scene translated as a whole (same sizes, same offsets
    between items) so its items' centre lies within the jitter of the canvas centre; it still passes the oracle;
    scenes without a relation are left as they are; an unknown composition names the allowed ones."""
    from spatialscore.data.prompts import PromptWriter
    from spatialscore.data.scene import CENTRE_JITTER

    writer = PromptWriter(random.Random(5))
    only = {"position": 1, "single_object": 0, "two_object": 0, "counting": 0, "colors": 0, "color_attr": 0}
    far = 0
    for i in range(30):
        meta = writer.sample("short", only)
        free = sample_scene(meta, random.Random(i), scale=1.5)
        centred = sample_scene(meta, random.Random(i), scale=1.5, composition="centred")
        (a, b), (ca, cb) = free.objects, centred.objects
        assert (ca.size, ca.shape, cb.color) == (a.size, a.shape, b.color)
        assert (ca.x - cb.x, ca.y - cb.y) == pytest.approx((a.x - b.x, a.y - b.y), abs=1e-9)
        lo_x, hi_x = min(o.x - o.radius for o in (ca, cb)), max(o.x + o.radius for o in (ca, cb))
        lo_y, hi_y = min(o.y - o.radius for o in (ca, cb)), max(o.y + o.radius for o in (ca, cb))
        assert abs((lo_x + hi_x) / 2 - 0.5) <= CENTRE_JITTER + 1e-9 and abs((lo_y + hi_y) / 2 - 0.5) <= CENTRE_JITTER + 1e-9
        far += abs((a.x + b.x) / 2 - 0.5) > CENTRE_JITTER + 0.05
        assert judge(render(centred, 64), meta).passed
    assert far >= 5  # the free scenes were often off-centre: the option did move them
    single = PromptWriter(random.Random(1)).sample("short", {**only, "position": 0, "single_object": 1})
    assert sample_scene(single, random.Random(2), composition="centred").to_dict() == \
        sample_scene(single, random.Random(2)).to_dict()
    with pytest.raises(SpatialScoreError, match="centred"):
        sample_scene(single, random.Random(2), composition="middle")


def test_class_maps_cover_exactly_the_drawn_objects():
    import torch

    from spatialscore.train.generator import layout_targets

    scene = Scene([Obj("star", "red", 0.3, 0.3, 0.25, 0.0, (230, 20, 20)), Obj("circle", "blue", 0.7, 0.7, 0.2, 0.0, (20, 20, 230))])
    labels = render_labels(scene, 64)
    assert labels.shape == (2, 64, 64) and labels.dtype == np.uint8
    image = np.asarray(render(scene, 64)).astype(int)
    drawn = np.abs(image - np.array(scene.background)).sum(-1) > 60
    assert (drawn == (labels[0] > 0)).mean() > 0.98  # only anti-aliased rims may differ
    assert labels[0, 19, 19] == 1 + SHAPES.index("star") and labels[1, 19, 19] == 1 + list(COLORS).index("red")
    assert labels[0, 45, 45] == 1 + SHAPES.index("circle") and labels[1, 45, 45] == 1 + list(COLORS).index("blue")
    assert labels[0, 5, 60] == labels[1, 5, 60] == 0
    shares = layout_targets(torch.from_numpy(labels[None]), 8).float()
    assert shares.shape == (1, 64, len(SHAPES) + 2 + len(COLORS) + 1)
    split = len(SHAPES) + 2
    assert torch.allclose(shares[..., :split].sum(-1), torch.ones(1, 64), atol=1e-3)
    assert torch.allclose(shares[..., split:].sum(-1), torch.ones(1, 64), atol=1e-3)
    assert shares[0, 2 * 8 + 2, 1 + SHAPES.index("star")] > 0.9  # token (2, 2) lies inside the star


def test_class_maps_match_the_cached_training_images(tmp_path, monkeypatch):
    from spatialscore.data.tensors import captioned_images, captioned_labels

    monkeypatch.setenv("SPATIALSCORE_CACHE", str(tmp_path))
    args = (12, 3, "short", "train", 64, {"two_object": 1})
    images, _ = captioned_images(*args, workers=1, progress=False, object_scale=1.5)
    labels = captioned_labels(*args, workers=1, progress=False, object_scale=1.5)
    assert labels.shape == (12, 2, 64, 64)
    background = images[:, :1, :1].int()
    drawn = (images.int() - background).abs().sum(-1) > 60
    assert ((labels[:, 0] > 0) == drawn).float().mean() > 0.98


def test_the_rough_renderer_keeps_each_object_where_the_scene_puts_it():
    """Lumpy outlines, a tint and noise, but the layout a pair's label depends on stays: each object's foreground
    centroid stays within 0.03 of the side of where the clean render draws it; the same rng state, the same pixels."""
    from spatialscore.data.augment import rough

    rng = random.Random(0)
    for i in range(12):
        scene = Scene(background=(245, 245, 245), objects=[
            Obj(SHAPES[i % len(SHAPES)], "red", x=rng.uniform(0.25, 0.75), y=rng.uniform(0.25, 0.75), size=0.2,
                rgb=(210, 30, 30))])
        image = rough(scene, 128, random.Random(i))
        assert image.size == (128, 128)
        assert np.array_equal(np.asarray(image), np.asarray(rough(scene, 128, random.Random(i))))
        array, clean = np.asarray(image).astype(float), np.asarray(render(scene, 128)).astype(float)
        assert not np.array_equal(array, clean)
        (y, x), (y0, x0) = (np.argwhere(a[..., 0] - a[..., 1:].mean(-1) > 80).mean(0) / 128 for a in (array, clean))
        assert abs(x - x0) < 0.03 and abs(y - y0) < 0.03  # a quarter of the relation margin (0.12)


def test_rough_pairs_keep_their_prompt_and_perturbation_and_only_change_pixels():
    clean, rough_all = PairSpec(seed=2), PairSpec(seed=2, rough=1.0)
    for index in range(6):
        record, chosen, rejected = make_pair(index, clean)
        record_r, chosen_r, rejected_r = make_pair(index, rough_all)
        assert record_r.pop("rough") is True and "rough" not in record
        assert record_r == record
        assert not np.array_equal(np.asarray(chosen), np.asarray(chosen_r))
        assert not np.array_equal(np.asarray(chosen_r), np.asarray(rejected_r))
