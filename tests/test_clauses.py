"""The clause judge against hand-computed cases of GenEval's rules."""

import pytest

from spatialscore.data.clauses import Detection, evaluate, relation_offset, relations


def test_position_rule_hand_computed():
    # A: centre (10, 50), size 10x10; B: centre (40, 50), size 10x10. offset (-30, 0), shrink 0.1*(10+10) = 2
    # -> revised (-28, 0) / 30 = (-0.933, 0): left of.
    a, b = (5, 45, 15, 55), (35, 45, 45, 55)
    dx, dy = relation_offset(a, b)
    assert dx == pytest.approx(-28 / 30) and dy == 0
    assert relations(a, b) == {"left of"}
    assert relations(b, a) == {"right of"}


def test_diagonal_offset_gives_both_or_neither():
    # offset (30, 30): revised (28, 28) / 42.43 = 0.66 each -> right of AND below
    assert relations((35, 35, 45, 45), (5, 5, 15, 15)) == {"right of", "below"}
    # offset (10, 20) with big objects: revised x = max(10 - 0.1*40, 0) = 6 -> 6/22.4 = 0.27 (no); y = 16/22.4 = 0.72
    assert relations((0, 20, 20, 40), (-10, 0, 10, 20)) == {"below"}


def test_overlapping_centres_have_no_relation():
    assert relations((0, 0, 10, 10), (0, 0, 10, 10)) == set()


def test_evaluate_geneval_counting_and_colour():
    meta = {"tag": "counting", "include": [{"class": "circle", "count": 2, "color": "red"}],
            "exclude": [{"class": "circle", "count": 3, "color": "red"}]}
    two = [Detection("circle", "red", (0, 0, 1, 1)), Detection("circle", "red", (5, 5, 6, 6))]
    assert evaluate(meta, two).passed
    three = two + [Detection("circle", "red", (9, 9, 10, 10))]
    verdict = evaluate(meta, three)
    assert not verdict.passed and [c.kind for c in verdict.failures()] == ["count"]
    wrong_colour = [Detection("circle", "red", (0, 0, 1, 1)), Detection("circle", "blue", (5, 5, 6, 6))]
    assert [c.kind for c in evaluate(meta, wrong_colour).failures()] == ["color"]


def test_evaluate_relation_with_colour_matching_and_text():
    meta = {"include": [{"class": "circle", "count": 1, "color": "blue"},
                        {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}],
            "text": ["HELLO"]}
    red, blue = Detection("circle", "red", (0, 0, 10, 10)), Detection("circle", "blue", (40, 0, 50, 10))
    sign = Detection("sign", None, (0, 40, 50, 60), text="hello")
    assert evaluate(meta, [red, blue, sign]).passed
    swapped = [Detection("circle", "red", blue.box), Detection("circle", "blue", red.box), sign]
    failures = evaluate(meta, swapped).failures()
    assert [c.kind for c in failures] == ["position"] and failures[0].margin < 0
    misspelled = [red, blue, Detection("sign", None, sign.box, text="HELIO")]
    assert [c.kind for c in evaluate(meta, misspelled).failures()] == ["text"]
    assert [c.kind for c in evaluate(meta, [blue, sign]).failures()] == ["color", "position"]
