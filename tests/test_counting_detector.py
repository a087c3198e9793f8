"""The `counting` head with an open-vocabulary detector (a tiny random OWLv2, offline), and the box counting under
it on hand-made boxes."""

import math

import numpy as np
import pytest
import torch

from spatialscore.data.pairs import PairSpec, make_pair
from spatialscore.errors import SpatialScoreError
from spatialscore.heads import get_head
from spatialscore.heads.detector import box_iou, count_boxes, nms, owlv2_pixels, tiny_owlv2
from spatialscore.heads.learned import tiny_clip, tiny_clip_tokenizer
from spatialscore.heads.shapes import count_reward, query_phrase


@pytest.fixture(scope="module")
def batch():
    """Four shapes-world images with their prompts and metadata."""
    images, prompts, meta = [], [], []
    for i in range(4):
        record, image, _ = make_pair(i, PairSpec(seed=3, style="mixed"))
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
        prompts.append(record["prompt"])
        meta.append({"include": record["meta"]["include"]})
    return torch.stack(images), prompts, meta


@pytest.fixture(scope="module")
def head():
    return get_head("counting", tiny=True)


def test_tiny_detector_head_shape_range_determinism_and_batch_of_one(head, batch):
    images, prompts, meta = batch
    out = head(images, prompts, meta)
    assert out.scores.shape == (len(prompts),) and out.scores.dtype == torch.float32
    assert ((out.scores > 0) & (out.scores <= 1)).all()
    assert torch.equal(head(images, prompts, meta).scores, out.scores)
    assert torch.equal(get_head("counting", tiny=True)(images, prompts, meta).scores, out.scores)
    single = head(images[:1], prompts[:1], meta[:1]).scores
    assert single.shape == (1,) and single.item() == pytest.approx(out.scores[0].item())


def test_tiny_detector_scores_are_count_rewards_of_what_it_finds(head, batch):
    images, prompts, meta = batch
    queries = [[query_phrase(e) for e in m["include"]] for m in meta]
    found = head.detector.count(images, queries)
    assert [len(f) for f in found] == [len(q) for q in queries]
    expected = [count_reward(f, [int(e.get("count", 1)) for e in m["include"]]) for f, m in zip(found, meta)]
    assert head(images, prompts, meta).scores.tolist() == pytest.approx(expected)
    nothing_asked = [{"include": []} for _ in prompts]
    assert head(images, prompts, nothing_asked).scores.tolist() == [1.0] * len(prompts)
    some_asked = [meta[0], {"include": []}, *meta[2:]]
    scores = head(images, prompts, some_asked).scores
    assert scores[1] == 1.0 and scores[0].item() == pytest.approx(expected[0])


def test_a_saved_tiny_owlv2_loads_through_detector(head, batch, tmp_path):
    model, processor = tiny_owlv2()
    model.save_pretrained(tmp_path / "owlv2")
    processor.save_pretrained(tmp_path / "owlv2")
    images, prompts, meta = batch
    loaded = get_head("counting", detector=str(tmp_path / "owlv2"))(images, prompts, meta).scores
    assert torch.equal(loaded, head(images, prompts, meta).scores)


def test_counting_detector_errors_name_the_head_and_argument(tmp_path):
    with pytest.raises(SpatialScoreError, match=r"'counting': detector: .*missing: no such directory"):
        get_head("counting", detector=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpatialScoreError, match=r"'counting': detector=.*empty: not a loadable OWLv2"):
        get_head("counting", detector=str(tmp_path / "empty"))
    _, processor = tiny_owlv2()
    tokenizer = tiny_clip_tokenizer()
    tiny_clip(tokenizer).save_pretrained(tmp_path / "clip")  # a CLIP beside an OWLv2 processor: heads missing
    processor.save_pretrained(tmp_path / "clip")
    with pytest.raises(SpatialScoreError, match=r"'counting': detector=.*clip: not an OWLv2 detector checkpoint"):
        get_head("counting", detector=str(tmp_path / "clip"))
    with pytest.raises(SpatialScoreError, match="'counting': threshold"):
        get_head("counting", tiny=True, threshold=1.5)


def test_nms_keeps_the_best_of_each_overlapping_group():
    boxes = torch.tensor([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10], [0, 0, 10, 10], [30, 30, 40, 40]],
                         dtype=torch.float32)
    assert box_iou(boxes[:1], boxes[1:2]).item() == pytest.approx(60 / 140)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.9, 0.1])
    # 1 overlaps 0 (IoU 0.43) and goes; 2 overlaps only 1, which is gone, so it stays; 3 duplicates 0 (a tie)
    assert nms(boxes, scores, iou=0.3).tolist() == [0, 2, 4]
    assert nms(boxes, scores, iou=0.5).tolist() == [0, 1, 2, 4]
    assert nms(boxes[:0], scores[:0], iou=0.3).tolist() == []


def test_count_boxes_gives_each_box_to_its_best_query():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]],
                         dtype=torch.float32)
    probs = torch.tensor([[0.9, 0.8],    # query 0
                          [0.8, 0.1],    # query 0, but overlaps the first box
                          [0.4, 0.7],    # query 1
                          [0.2, 0.25],   # below the threshold
                          [0.35, 0.31]])  # query 0
    assert count_boxes(boxes, probs, threshold=0.3) == [2, 1]
    assert count_boxes(boxes, probs, threshold=0.5) == [1, 1]
    assert count_boxes(boxes, probs[:, :0], threshold=0.3) == []


def test_count_reward_query_phrase_and_pixels():
    assert count_reward([3, 1], [1, 1]) == pytest.approx((math.exp(-2) + 1) / 2)
    assert count_reward([], []) == 1.0
    assert query_phrase({"class": "circle", "color": "red", "count": 2}) == "a photo of a red circle"
    assert query_phrase({"class": "sign"}) == "a photo of a sign"
    pixels = owlv2_pixels(torch.ones(1, 3, 32, 64), 64, mean=[0.5] * 3, std=[0.5] * 3)
    assert pixels.shape == (1, 3, 64, 64)
    assert (pixels[..., :32, :] == 1).all() and (pixels[..., 32:, :] == -1).all()  # padded below, not stretched
