"""The shapes-world Relation Network's dense supervision: per-cell targets from a scene graph and its metadata, the
reading loss on hand-made cases, and the clause evidence f sees."""

import numpy as np
import torch

from spatialscore.data.scene import Obj, Scene
from spatialscore.data.targets import CELL_COLORS, CELL_SHAPES, MAX_RELATIONS, cell_targets, relation_targets
from spatialscore.models.base import build_model
from spatialscore.models.relation import balanced_mean, reading_loss

META = {"prompt": "a red circle left of a blue square",
        "include": [{"class": "square", "count": 1, "color": "blue"},
                    {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}]}


def scene() -> Scene:
    return Scene([Obj("square", "blue", 0.8, 0.3, 0.2, group=0), Obj("circle", "red", 0.2, 0.6, 0.2, group=1),
                  Obj("star", "green", 0.5, 0.9, 0.12)])


def test_cell_targets_name_each_cell_s_entry_and_what_the_prompt_asks_of_it():
    t = cell_targets(scene(), 4, META)
    assert t["group"][1, 3] == 1 and t["group"][2, 0] == 2 and t["group"][3, 2] == 0  # the star stands for no entry
    assert CELL_COLORS[t["asked_color"][1, 3]] == "blue" and CELL_SHAPES[t["asked_shape"][1, 3]] == "square"
    assert CELL_COLORS[t["asked_color"][2, 0]] == "red" and CELL_SHAPES[t["asked_shape"][2, 0]] == "circle"
    assert t["asked_color"][3, 2] == 0 and t["asked_shape"][3, 2] == 0 and t["shape"][3, 2] > 0
    assert "asked_color" not in cell_targets(scene(), 4)


def test_relation_targets_list_the_prompt_s_relations_by_group():
    rows = relation_targets(META)
    assert rows.shape == (MAX_RELATIONS, 3)
    assert rows[0].tolist() == [2, 0, 1] and (rows[1:] == -1).all()  # circle (group 2) left of square (group 1)
    assert (relation_targets({"include": [{"class": "star"}]}) == -1).all()


def test_balanced_mean_weighs_rare_positives_like_the_rest():
    values = torch.tensor([4.0, 0.0, 0.0, 0.0, 2.0])
    assert balanced_mean(values, torch.tensor([1, 0, 0, 0, 0])).item() == 4.0 + 0.5
    assert abs(balanced_mean(values, torch.zeros(5)).item() - 1.2) < 1e-6  # no positive: the plain mean


def _targets(faithful: bool) -> dict:
    """Two selected cells holding groups 2 and 1 of a prompt where group 2 is left of group 1."""
    group = torch.zeros(1, 2, 2, dtype=torch.uint8)
    group[0, 0, 0], group[0, 0, 1] = 2, 1
    colors = torch.zeros(1, 2, 2, dtype=torch.uint8)
    colors[0, 0, 0], colors[0, 0, 1] = CELL_COLORS.index("red"), CELL_COLORS.index("blue")
    shapes = torch.zeros(1, 2, 2, dtype=torch.uint8)
    shapes[0, 0, 0], shapes[0, 0, 1] = CELL_SHAPES.index("circle"), CELL_SHAPES.index("square")
    return {"group": group, "asked_color": colors, "asked_shape": shapes,
            "relations": torch.from_numpy(relation_targets(META))[None], "faithful": torch.tensor([faithful]),
            "items": torch.tensor([2], dtype=torch.uint8)}


def _readings(expected_x: float, confidence: float = 30.0) -> dict:
    expected = torch.zeros(1, 2, 2, 2)
    expected[0, 0, 1, 0], expected[0, 1, 0, 0] = expected_x, -expected_x
    color = torch.zeros(1, 2, len(CELL_COLORS))
    color[0, 0, CELL_COLORS.index("red")] = color[0, 1, CELL_COLORS.index("blue")] = confidence
    shape = torch.zeros(1, 2, len(CELL_SHAPES))
    shape[0, 0, CELL_SHAPES.index("circle")] = shape[0, 1, CELL_SHAPES.index("square")] = confidence
    return {"expected": expected, "color": color, "shape": shape, "total": torch.tensor([2.0])}


def test_reading_loss_is_zero_for_the_right_reading_and_ignores_perturbed_images():
    top = torch.tensor([[0, 1]])  # the two cells of row 0
    assert reading_loss(_readings(-1.0), top, _targets(True)).item() < 1e-6
    wrong_way = reading_loss(_readings(1.0), top, _targets(True)).item()
    assert abs(wrong_way - 4.0) < 1e-5  # (1 - (-1))^2 on the clause pairs, nothing elsewhere
    assert reading_loss(_readings(1.0), top, _targets(False)).item() == 0.0


def test_evidence_counts_contradicted_relations_and_wrong_colours():
    model = build_model({"arch": "relation", "channels": 16, "text_dim": 32, "g_dim": 32, "f_dim": 32,
                         "image_size": 64, "grid": 4})
    c, nc = model.position_slice.stop, len(CELL_COLORS)
    objects = torch.zeros(1, 2, c + nc + len(CELL_SHAPES) + 36)
    objects[0, 0, c + CELL_COLORS.index("red")] = objects[0, 1, c + CELL_COLORS.index("blue")] = 1
    objects[0, 0, c + nc + CELL_SHAPES.index("circle")] = objects[0, 1, c + nc + CELL_SHAPES.index("square")] = 1
    readings, ones, two = _readings(-1.0), torch.ones(1, 2), torch.tensor([2.0])
    displacement = torch.zeros(1, 2, 2, 2)
    displacement[0, 0, 1, 0], displacement[0, 1, 0, 0] = -1.0, 1.0  # the circle is left of the square
    kept = model.evidence(objects, ones, readings, displacement, torch.zeros(1, 2, 2), two)
    broken = model.evidence(objects, ones, readings, -displacement, torch.zeros(1, 2, 2), two)
    assert kept[0, 0] == 0 and kept[0, 1] == 1 and broken[0, 0] == 1 and broken[0, 1] == 0
    assert kept[0, 2] < 1e-6 and kept[0, 3] < 1e-6 and kept[0, 6] == kept[0, 7] == 0
    one_more = model.evidence(objects, ones, readings, displacement, torch.zeros(1, 2, 2), torch.tensor([3.0]))
    assert one_more[0, 6] == 1 and one_more[0, 7] == 0  # an object the prompt did not ask for
    recoloured = objects.clone()
    recoloured[0, 0, c:c + nc] = torch.from_numpy(np.eye(nc)[CELL_COLORS.index("green")])
    assert abs(model.evidence(recoloured, ones, readings, displacement, torch.zeros(1, 2, 2), two)[0, 2] - 1) < 1e-6


def test_glyph_targets_sit_on_the_drawn_letters():
    from spatialscore.data.render import render
    from spatialscore.data.scene import Sign, sign_size
    from spatialscore.data.targets import LETTERS, glyph_targets

    sign = Scene(signs=[Sign("HELLO", 0.5, 0.4, *sign_size("HELLO"))])
    rows = glyph_targets(sign)
    assert "".join(LETTERS[int(r[2])] for r in rows if r[2] >= 0) == "HELLO"
    ink = np.asarray(render(sign, 128)).mean(-1) < 100  # the letters are the only dark pixels
    for x, y, _ in rows[:5]:
        col, row = int(x * 128), int(y * 128)
        assert ink[row - 7:row + 8, col - 3:col + 4].any()
    xs = rows[:5, 0]
    assert (np.diff(xs) > 0).all() and abs(xs.mean() - 0.5) < 0.03


def test_glyph_loss_is_low_only_where_the_letters_are_spotted():
    from spatialscore.data.targets import LETTERS
    from spatialscore.models.relation import glyph_loss

    glyphs = torch.full((1, 16, 3), -1.0)
    glyphs[0, 0] = torch.tensor([0.5, 0.5, LETTERS.index("A")])
    right = torch.full((1, len(LETTERS), 8, 8), -20.0)
    right[0, LETTERS.index("A"), 3:6, 3:6] = 20.0  # the glyph's cell and its neighbours
    wrong = torch.full((1, len(LETTERS), 8, 8), -20.0)
    wrong[0, LETTERS.index("B"), 3:6, 3:6] = 20.0
    assert glyph_loss(right, glyphs).item() < 1e-6 and glyph_loss(wrong, glyphs).item() > 10
