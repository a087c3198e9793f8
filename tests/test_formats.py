"""Data formats: every accepted format loads, and every kind of bad input is reported with file, line and field."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spatialscore.data.formats import (
    PairRecord,
    Problem,
    load_pairs,
    load_prompts,
    validate_pair_record,
    validate_prompt_record,
    validate_path,
)
from spatialscore.errors import SpatialScoreError

GENEVAL = [
    '{"tag": "position", "include": [{"class": "zebra", "count": 1}, {"class": "giraffe", "count": 1, '
    '"position": ["right of", 0]}], "prompt": "a photo of a giraffe right of a zebra"}',
    '{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], '
    '"prompt": "a photo of two clocks"}',
    '{"tag": "color_attr", "include": [{"class": "bench", "count": 1, "color": "red"}, {"class": "car", "count": 1, '
    '"color": "green"}], "prompt": "a photo of a red bench and a green car"}',
    '{"tag": "colors", "include": [{"class": "teddy bear", "count": 1, "color": "pink"}], '
    '"prompt": "a photo of a pink teddy bear"}',
]
META = {
    "prompt": "a red circle left of a blue square",
    "tag": "position",
    "include": [
        {"class": "square", "count": 1, "color": "blue"},
        {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]},
    ],
    "text": ["HELLO"],
}


def png(seed: int, size: int = 24) -> bytes:
    # Noise does not compress, so half the bytes cuts into the pixel data rather than the header
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def pair(n: int, **changes: object) -> dict:
    rec = {
        "id": f"p{n}",
        "prompt": META["prompt"],
        "chosen": f"img/c{n}.png",
        "rejected": f"img/r{n}.png",
        "perturbation": {"kinds": ["flip"], "n": 1},
        "meta": META,
    }
    return {**rec, **changes}


def write_pairs(tmp_path: Path, lines: list[object], name: str = "pairs.jsonl") -> Path:
    """Writes images c1..c4 / r1..r4 under img/ and the lines (dicts as JSON, strings verbatim)."""
    (tmp_path / "img").mkdir(exist_ok=True)
    for n in range(1, 5):
        (tmp_path / f"img/c{n}.png").write_bytes(png(n))
        (tmp_path / f"img/r{n}.png").write_bytes(png(10 + n))
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_problem_str_omits_missing_parts() -> None:
    assert str(Problem("a.jsonl", 3, "include[0].count", "missing")) == "a.jsonl:3: include[0].count: missing"
    assert str(Problem("a.jsonl", None, None, "empty")) == "a.jsonl: empty"


def test_pair_jsonl_loads_images_relative_to_the_file(tmp_path: Path) -> None:
    path = write_pairs(tmp_path, [pair(1), "", pair(2, perturbation=None, meta=None)])
    records = load_pairs(path)
    assert [r.id for r in records] == ["p1", "p2"]
    first = records[0]
    assert isinstance(first, PairRecord) and first.chosen.mode == "RGB"
    assert np.array_equal(np.asarray(first.chosen), pixels(png(1)))
    assert np.array_equal(np.asarray(first.rejected), pixels(png(11)))
    assert first.perturbation == {"kinds": ["flip"], "n": 1} and first.meta == META
    assert records[1].perturbation is None and records[1].meta is None
    assert validate_path(path) == ("pairs-jsonl", 2, [])


def test_geneval_prompts_load_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(GENEVAL) + "\n")
    assert load_prompts(path) == [json.loads(line) for line in GENEVAL]
    assert validate_path(path) == ("prompts-jsonl", 4, [])


def test_parquet_with_image_feature_dicts_and_json_columns(tmp_path: Path) -> None:
    (tmp_path / "r.png").write_bytes(png(2))
    meta_b = {"prompt": "x", "tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    table = pa.Table.from_pylist([
        {
            "prompt": "one",
            "chosen": {"bytes": png(1), "path": None},
            "rejected": {"bytes": None, "path": "r.png"},
            "meta": {"tag": "counting", "include": [{"class": "star", "count": 2}]},
        },
        {"prompt": "two", "chosen": {"bytes": png(3), "path": "ignored.png"}, "rejected": {"bytes": png(4), "path": None},
         "meta": meta_b},
    ])
    table = table.append_column("perturbation", pa.array([json.dumps({"kinds": ["count"], "n": 1}), None]))
    pq.write_table(table, tmp_path / "pairs.parquet")
    one, two = load_pairs(tmp_path / "pairs.parquet")
    assert np.array_equal(np.asarray(one.chosen), pixels(png(1)))
    assert np.array_equal(np.asarray(one.rejected), pixels(png(2)))
    assert np.array_equal(np.asarray(two.chosen), pixels(png(3)))
    assert one.id == "pairs-1" and one.perturbation == {"kinds": ["count"], "n": 1} and two.perturbation is None
    # the struct column gives row one a "color": None and row two a "prompt"; absent keys must stay absent
    assert one.meta == {"tag": "counting", "include": [{"class": "star", "count": 2}]}
    assert two.meta == meta_b
    assert validate_path(tmp_path / "pairs.parquet") == ("pairs-table", 2, [])


def test_hf_save_to_disk_directory(tmp_path: Path) -> None:
    import datasets

    images = [Image.open(io.BytesIO(png(n))) for n in range(4)]
    features = datasets.Features(
        {"id": datasets.Value("string"), "prompt": datasets.Value("string"),
         "chosen": datasets.Image(), "rejected": datasets.Image()}
    )
    data = {"id": ["a", "b"], "prompt": ["p a", "p b"], "chosen": images[:2], "rejected": images[2:]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "ds"))
    records = load_pairs(tmp_path / "ds")
    assert [(r.id, r.prompt) for r in records] == [("a", "p a"), ("b", "p b")]
    assert np.array_equal(np.asarray(records[1].rejected), pixels(png(3)))
    assert validate_path(tmp_path / "ds") == ("pairs-table", 2, [])


def test_pickapic_labels_and_ties(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = pa.table({
        "caption": ["jpg_0 wins", "jpg_1 wins", "tie"],
        "jpg_0": [png(1), png(2), png(3)],
        "jpg_1": [png(11), png(12), png(13)],
        "label_0": [1.0, 0.0, 0.5],
    })
    pq.write_table(table, tmp_path / "pap.parquet")
    with caplog.at_level(logging.INFO, logger="spatialscore.data"):
        first, second = load_pairs(tmp_path / "pap.parquet")
    assert np.array_equal(np.asarray(first.chosen), pixels(png(1)))
    assert np.array_equal(np.asarray(second.chosen), pixels(png(12)))
    assert np.array_equal(np.asarray(second.rejected), pixels(png(2)))
    assert "skipped 1 ties" in caplog.text
    assert validate_path(tmp_path / "pap.parquet") == ("pickapic", 3, [])


def corrupt_chosen(tmp_path: Path) -> Path:
    path = write_pairs(tmp_path, [pair(1), pair(2)])
    data = (tmp_path / "img/c2.png").read_bytes()
    (tmp_path / "img/c2.png").write_bytes(data[: len(data) // 2])
    return path


def prompts_file(tmp_path: Path, bad: str) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(GENEVAL[0] + "\n" + bad + "\n")
    return path


def with_include(**entry: object) -> str:
    return json.dumps({**META, "include": [META["include"][0], {**META["include"][1], **entry}]})


# (name, writer, loader, expected "file:line: field" prefix, a fragment of the message)
BAD = [
    ("corrupt png", corrupt_chosen, load_pairs, "pairs.jsonl:2: chosen", "unreadable image"),
    ("missing image", lambda t: write_pairs(t, [pair(1), pair(2, rejected="img/none.png")]), load_pairs,
     "pairs.jsonl:2: rejected", "no such image file"),
    ("truncated line", lambda t: write_pairs(t, [pair(1), json.dumps(pair(2))[:40]]), load_pairs,
     "pairs.jsonl:2", "invalid JSON"),
    ("not an object", lambda t: write_pairs(t, [pair(1), "[1, 2]"]), load_pairs, "pairs.jsonl:2", "JSON object"),
    ("missing prompt", lambda t: write_pairs(t, [pair(1), {k: v for k, v in pair(2).items() if k != "prompt"}]),
     load_pairs, "pairs.jsonl:2: prompt", "missing"),
    ("empty prompt", lambda t: write_pairs(t, [pair(1), pair(2, prompt="  ")]), load_pairs,
     "pairs.jsonl:2: prompt", "must not be empty"),
    ("bad kind", lambda t: write_pairs(t, [pair(1), pair(2, perturbation={"kinds": ["blur"], "n": 1})]), load_pairs,
     "pairs.jsonl:2: perturbation.kinds[0]", "swap, flip, count, attribute, text"),
    ("bad meta", lambda t: write_pairs(t, [pair(1), pair(2, meta={**META, "include": "circle"})]), load_pairs,
     "pairs.jsonl:2: meta.include", "must be a non-empty list"),
    ("unknown relation", lambda t: prompts_file(t, with_include(position=["behind", 0])), load_prompts,
     "prompts.jsonl:2: include[1].position", "left of, right of, above, below"),
    ("index not earlier", lambda t: prompts_file(t, with_include(position=["left of", 1])), load_prompts,
     "prompts.jsonl:2: include[1].position", "earlier include entry"),
    ("count is a string", lambda t: prompts_file(t, with_include(count="2")), load_prompts,
     "prompts.jsonl:2: include[1].count", "must be an integer, got string '2'"),
    ("missing tag", lambda t: prompts_file(t, json.dumps({k: v for k, v in META.items() if k != "tag"})),
     load_prompts, "prompts.jsonl:2: tag", "missing"),
]


@pytest.mark.parametrize(("writer", "loader", "where", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_named_and_skippable(tmp_path, caplog, writer, loader, where, fragment) -> None:
    path = writer(tmp_path)
    with pytest.raises(SpatialScoreError) as info:
        loader(path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}/{where}") and fragment in message
    with caplog.at_level(logging.WARNING, logger="spatialscore.data"):
        good = loader(path, on_error="skip")
    assert len(good) == 1
    assert "skipped 1 of 2 records" in caplog.text and message in caplog.text
    _, count, problems = validate_path(path)
    assert count == 2 and problems and {p.line for p in problems} == {2}


def test_validate_path_reports_every_problem(tmp_path: Path) -> None:
    bad_two = pair(2, prompt=3, rejected="img/none.png")
    bad_three = pair(3, id="", meta={**META, "include": [{"class": "x", "count": -1}]})
    fmt, count, problems = validate_path(write_pairs(tmp_path, [pair(1), bad_two, bad_three, "{oops"]))
    assert (fmt, count) == ("pairs-jsonl", 4)
    assert [(p.line, p.field) for p in problems] == [
        (2, "prompt"), (2, "rejected"), (3, "id"), (3, "meta.include[0].count"), (4, None)
    ]


def test_parquet_rows_are_numbered(tmp_path: Path) -> None:
    half = png(2)[:200]
    pq.write_table(pa.table({"prompt": ["a", "b"], "chosen": [png(1), half], "rejected": [png(3), png(4)]}),
                   tmp_path / "t.parquet")
    with pytest.raises(SpatialScoreError, match=r"t\.parquet:2: chosen: unreadable image"):
        load_pairs(tmp_path / "t.parquet")
    assert len(load_pairs(tmp_path / "t.parquet", on_error="skip")) == 1


def test_pickapic_bad_label(tmp_path: Path) -> None:
    pq.write_table(pa.table({"caption": ["c"], "jpg_0": [png(1)], "jpg_1": [png(2)], "label_0": [0.7]}),
                   tmp_path / "pap.parquet")
    _, _, problems = validate_path(tmp_path / "pap.parquet")
    assert [(p.line, p.field) for p in problems] == [(1, "label_0")]


def test_prompt_is_optional_only_inside_pair_meta(tmp_path: Path) -> None:
    bare = {k: v for k, v in META.items() if k != "prompt"}
    assert [str(p) for p in validate_prompt_record(bare, "m.jsonl", 7)] == ["m.jsonl:7: prompt: missing"]
    assert validate_prompt_record(json.loads(GENEVAL[0]), "m.jsonl", 1) == []
    write_pairs(tmp_path, [])
    assert validate_pair_record(pair(1, meta=bare), "x.jsonl", 1, tmp_path) == []


def test_check_images_false_does_not_decode(tmp_path: Path) -> None:
    corrupt_chosen(tmp_path)
    rec = pair(2)
    assert validate_pair_record(rec, "x.jsonl", 2, tmp_path, check_images=False) == []
    assert [p.field for p in validate_pair_record(rec, "x.jsonl", 2, tmp_path)] == ["chosen"]
    missing = validate_pair_record(pair(2, chosen="nope.png"), "x.jsonl", 2, tmp_path, check_images=False)
    assert [p.field for p in missing] == ["chosen"]


def test_path_level_errors(tmp_path: Path) -> None:
    with pytest.raises(SpatialScoreError, match="no such file"):
        load_pairs(tmp_path / "absent.jsonl")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SpatialScoreError, match=r"notes\.txt.*accepted: .*\.jsonl"):
        validate_path(tmp_path / "notes.txt")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(SpatialScoreError, match="match no format"):
        load_pairs(tmp_path / "other.parquet")
    prompts = prompts_file(tmp_path, GENEVAL[1])
    with pytest.raises(SpatialScoreError, match="holds prompt metadata, expected preference pairs"):
        load_pairs(prompts)
    with pytest.raises(SpatialScoreError, match="on_error"):
        load_prompts(prompts, on_error="ignore")
