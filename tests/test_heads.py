"""The reward-head registry, parametrised over every registered head (timm style), and the plugin entry point."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from spatialscore.data.pairs import PairSpec, make_pair
from spatialscore.errors import SpatialScoreError
from spatialscore.heads import RewardHead, get_head, head_class, head_names, register_head
from spatialscore.heads.shapes import edit_distance, text_similarity


def _batch(n: int, seed: int = 0):
    """chosen and rejected images of n shapes-world pairs, with prompts and metadata."""
    chosen, rejected, prompts, meta = [], [], [], []
    for i in range(n):
        record, c, r = make_pair(i, PairSpec(seed=seed, style="mixed"))
        chosen.append(torch.from_numpy(np.array(c)).permute(2, 0, 1).float() / 255)
        rejected.append(torch.from_numpy(np.array(r)).permute(2, 0, 1).float() / 255)
        prompts.append(record["prompt"])
        meta.append({k: v for k, v in record["meta"].items() if k != "scenes"})
    return torch.stack(chosen), torch.stack(rejected), prompts, meta


@pytest.fixture(scope="module")
def batch():
    return _batch(6, seed=3)


@pytest.mark.parametrize("name", head_names())
def test_every_head_shape_range_determinism_and_batch_of_one(name, batch, tmp_path):
    chosen, _, prompts, meta = batch
    head = get_head(name, **head_class(name).example_kwargs(tmp_path))
    out = head(chosen, prompts, meta)
    assert out.scores.shape == (len(prompts),) and out.scores.dtype == torch.float32
    assert torch.isfinite(out.scores).all()
    if head.bounded:
        assert (out.scores >= 0).all() and (out.scores <= 1).all()
    assert torch.equal(head(chosen, prompts, meta).scores, out.scores)
    single = head(chosen[:1], prompts[:1], meta[:1]).scores
    assert single.shape == (1,) and single.item() == pytest.approx(out.scores[0].item())


@pytest.mark.parametrize("name", head_names())
def test_every_head_rejects_bad_images(name, batch, tmp_path):
    chosen, _, prompts, meta = batch
    head = get_head(name, **head_class(name).example_kwargs(tmp_path))
    with pytest.raises(SpatialScoreError, match=r"FloatTensor\[B, 3, H, W\]"):
        head(chosen[:, :1], prompts, meta)
    with pytest.raises(SpatialScoreError, match=r"\[0, 1\]"):
        head(chosen * 255, prompts, meta)
    with pytest.raises(SpatialScoreError, match="6 images but 5 prompts"):
        head(chosen, prompts[:5], meta[:5])


def test_oracle_head_prefers_chosen_over_rejected():
    chosen, rejected, prompts, meta = _batch(16, seed=5)
    head = get_head("oracle")
    c, r = head(chosen, prompts, meta), head(rejected, prompts, meta)
    assert (c.extras["passed"] == 1).all() and (r.extras["passed"] == 0).all()
    assert (c.scores > r.scores).all()


def test_oracle_dense_position_grades_relations():
    from spatialscore.data.clauses import Detection

    meta = {"include": [{"class": "circle", "color": "red", "count": 1},
                        {"class": "square", "color": "blue", "count": 1, "position": ["left of", 0]}]}
    red = Detection("circle", "red", (40, 40, 50, 50))
    dense = get_head("oracle", dense_position=True)

    def score(square_x: float) -> float:
        return dense.judge([red, Detection("square", "blue", (square_x, 40, square_x + 10, 50))], meta)[0]

    # the blue square moving from beside the circle to well left of it: the score keeps rising with the margin
    # after the relation holds; on the wrong side it is flat at the presence clauses' share
    scores = [score(x) for x in (45, 30, 20, 5)]
    assert scores == sorted(scores) and len(set(scores)) == len(scores)
    assert score(60) == scores[0] == 1 / 3 and scores[-1] < 1.0
    assert dense.judge([red, Detection("square", "blue", (20, 40, 30, 50))], meta)[1] == {"passed": 1.0}
    missing, extras = dense.judge([red], meta)  # the square missing: below any layout with both objects
    assert missing < scores[0] and extras == {"passed": 0.0}
    binary = get_head("oracle")  # the default: a failed relation is failed, however near it came
    near, far = ([red, Detection("square", "blue", box)] for box in ((30, 10, 40, 20), (60, 40, 70, 50)))
    # near: up and to the left, more above than left of the circle (margin -0.25); far: to its right
    assert binary.judge(near, meta) == binary.judge(far, meta) and dense.judge(near, meta) > dense.judge(far, meta)


def test_counting_text_binding_values():
    assert edit_distance("HELLO", "HELO") == 1 and edit_distance("", "ABC") == 3
    assert text_similarity("hello", "HELIO") == pytest.approx(0.8)
    from spatialscore.data.clauses import Detection

    circles = [Detection("circle", "red", (0, 0, 1, 1)), Detection("circle", "blue", (2, 2, 3, 3))]
    meta = {"include": [{"class": "circle", "count": 3, "color": "red"}], "text": ["CAT"]}
    counting, _ = get_head("counting").judge(circles, meta)
    assert counting == pytest.approx(np.exp(-2))
    binding, _ = get_head("binding").judge(circles, {"include": [{"class": "circle", "count": 1, "color": "blue"},
                                                                {"class": "square", "count": 1, "color": "red"}]})
    assert binding == 0.5
    text, extras = get_head("text").judge(circles + [Detection("sign", None, (0, 0, 9, 9), text="CAR")], meta)
    assert text == pytest.approx(2 / 3) and extras["signs"] == 1


def test_unknown_and_duplicate_names():
    with pytest.raises(SpatialScoreError, match=r"unknown reward head 'countin' \(did you mean 'counting'\?\)"):
        get_head("countin")
    with pytest.raises(SpatialScoreError, match="registered twice"):
        register_head("oracle")(RewardHead)


@pytest.mark.parametrize("images, message", [
    (torch.rand(2, 4, 8, 8), r"images must be a FloatTensor\[B, 3, H, W\], got \(2, 4, 8, 8\)"),
    (torch.rand(2, 3, 8, 8) * 2, r"images must lie in \[0, 1\].*divide uint8 by 255"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), r"images must be floats in \[0, 1\], got dtype torch.uint8"),
    (torch.rand(3, 3, 8, 8), r"3 images but 2 prompts"),
])
def test_bad_images_are_named_errors(images, message):
    with pytest.raises(SpatialScoreError, match=r"head 'counting': " + message):
        get_head("counting")(images, ["a", "b"], [{"include": []}] * 2)


def test_meta_is_required_by_clause_heads(batch):
    chosen, _, prompts, _ = batch
    with pytest.raises(SpatialScoreError, match="needs each prompt's metadata"):
        get_head("oracle")(chosen, prompts)


PLUGIN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "brightness-head"
        version = "0.0.1"
        [project.entry-points."spatialscore.reward_heads"]
        brightness = "brightness_head:Brightness"
    """,
    "brightness_head.py": """
        from spatialscore.heads import RewardHead, RewardOutput

        class Brightness(RewardHead):
            description = "mean pixel value (an example plugin)"

            def score(self, images, prompts, meta):
                return RewardOutput(images.mean(dim=(1, 2, 3)))
    """,
}


def test_a_plugin_package_registers_through_the_entry_point(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, text in PLUGIN.items():
        (src / name).write_text(textwrap.dedent(text))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, capture_output=True)
    exe = str(Path(sys.executable).parent / "spatialscore")
    env = {**os.environ, "PYTHONPATH": str(target)}
    listed = subprocess.run([exe, "heads", "ls"], env=env, capture_output=True, text=True, check=True).stdout
    assert "brightness" in listed and "brightness-head" in listed and "oracle" in listed
    env["SPATIALSCORE_DISABLE_PLUGINS"] = "1"
    listed = subprocess.run([exe, "heads", "ls"], env=env, capture_output=True, text=True, check=True).stdout
    assert "brightness" not in listed and "oracle" in listed
