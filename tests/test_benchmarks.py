import json
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image, ImageOps

from spatialscore.data.check import render_prompts
from spatialscore.data.formats import load_prompts
from spatialscore.data.oracle import judge
from spatialscore.data.prompts import SHORT_TAGS
from spatialscore.errors import SpatialScoreError
from spatialscore.eval.benchmarks import BENCHMARKS_DIR, is_judgeable, list_benchmarks, load_benchmark

# GenEval's evaluation_metadata.jsonl, line for line in its own layout, with shapes-world classes
GENEVAL_LINES = """\
{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
{"tag": "two_object", "include": [{"class": "star", "count": 1}, {"class": "triangle", "count": 1}], "prompt": "a photo of a star and a triangle"}
{"tag": "counting", "include": [{"class": "star", "count": 2}], "exclude": [{"class": "star", "count": 3}], "prompt": "a photo of two stars"}
{"tag": "counting", "include": [{"class": "star", "count": 3}], "exclude": [{"class": "star", "count": 4}], "prompt": "a photo of three stars"}
{"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "red"}], "prompt": "a photo of a red triangle"}
{"tag": "position", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a square right of a circle"}
{"tag": "color_attr", "include": [{"class": "square", "count": 1, "color": "blue"}, {"class": "circle", "count": 1, "color": "yellow"}], "prompt": "a photo of a blue square and a yellow circle"}
"""

DPG_CSV = """\
item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,question_natural_language
0,"Eight cabbages, round and plump, in a field.","cabbage, field",1,0,entity,whole,entity - whole (cabbages),Are there cabbages?
0,"Eight cabbages, round and plump, in a field.","cabbage, field",2,1,other,count,"other - count (cabbages, ==8)",Are there eight cabbages?
0,"Eight cabbages, round and plump, in a field.","cabbage, field",3,1,attribute,shape,"attribute - shape (cabbages, round)",Are the cabbages round?
0,"Eight cabbages, round and plump, in a field.","cabbage, field",4,0,entity,whole,entity - whole (field),Is there a field?
COCOval2014000000010363,A red cup to the left of a blue plate.,"cup, plate",1,0,entity,whole,entity - whole (cup),Is there a cup?
COCOval2014000000010363,A red cup to the left of a blue plate.,"cup, plate",2,0,entity,whole,entity - whole (plate),Is there a plate?
COCOval2014000000010363,A red cup to the left of a blue plate.,"cup, plate",3,"1,2",relation,spatial,"relation - spatial (cup, plate, left of)",Is the cup to the left of the plate?
COCOval2014000000010363,A red cup to the left of a blue plate.,"cup, plate",4,1,attribute,color,"attribute - color (cup, red)",Is the cup red?
"""


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_script_reproduces_the_shipped_files(tmp_path):
    script = BENCHMARKS_DIR / "make_shapes_benchmarks.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, timeout=60)
    for name in ("shapes-short.jsonl", "shapes-long.jsonl"):
        assert (tmp_path / name).read_bytes() == (BENCHMARKS_DIR / name).read_bytes(), name


def test_shipped_shapes_sets_have_their_tags_distinct_prompts_and_valid_metadata():
    short, long = load_benchmark("shapes-short"), load_benchmark("shapes-long")
    tags = [r["tag"] for r in short.records]
    # held-out phrasing has only 8 single_object and 12 two_object prompts; the file takes them all
    assert Counter(tags) == {"single_object": 8, "two_object": 12, "counting": 50, "colors": 50, "position": 50,
                             "color_attr": 50}
    assert tags == sorted(tags, key=SHORT_TAGS.index)
    assert len(long.records) == 100 and {r["tag"] for r in long.records} == {"long"}
    for bench in (short, long):
        assert bench.format == "geneval" and all(map(is_judgeable, bench.records))
        assert len({r["prompt"] for r in bench.records}) == len(bench.records)
        assert load_prompts(bench.source) == bench.records == _read(BENCHMARKS_DIR / f"{bench.name}.jsonl")
    listed = {name: (fmt, n) for name, fmt, n, _ in list_benchmarks()}
    assert listed["shapes-short"] == ("geneval", 220) and listed["shapes-long"] == ("geneval", 100)


def test_shipped_geneval_file_loads_unchanged_with_its_licence():
    bench = load_benchmark("geneval")
    assert len(bench.records) == 553 and all(map(is_judgeable, bench.records))
    assert bench.records == _read(BENCHMARKS_DIR / "geneval.jsonl")
    assert "MIT License" in (BENCHMARKS_DIR / "geneval.LICENSE").read_text()


def test_geneval_format_loads_unchanged_and_the_rule_scorer_grades_it(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text(GENEVAL_LINES)
    bench = load_benchmark(str(path))
    assert (bench.name, bench.format, bench.source) == ("evaluation_metadata", "geneval", str(path))
    assert "".join(json.dumps(r) + "\n" for r in bench.records) == GENEVAL_LINES
    assert all(map(is_judgeable, bench.records))

    render_prompts(bench.records, tmp_path / "images", progress=False)
    images = [Image.open(tmp_path / "images" / f"{i:05d}.png").convert("RGB") for i in range(len(bench.records))]
    for image, meta in zip(images, bench.records):
        assert judge(image, meta).passed, meta["prompt"]

    single, _, two_stars, three_stars, red_triangle, position, color_attr = range(7)
    swapped_colours = {"tag": "color_attr", "include": [{"class": "square", "count": 1, "color": "yellow"},
                                                        {"class": "circle", "count": 1, "color": "blue"}]}
    failing = [(images[three_stars], bench.records[two_stars], "count"),  # the exclude clause: not three
               (images[two_stars], bench.records[three_stars], "presence"),
               (images[single], bench.records[red_triangle], "presence"),
               (ImageOps.mirror(images[position]), bench.records[position], "position"),
               (images[color_attr], swapped_colours, "color")]
    for image, meta, kind in failing:
        verdict = judge(image, meta).verdict
        assert not verdict.passed and kind in {c.kind for c in verdict.failures()}, (meta, verdict.to_dict())


def test_t2i_compbench_txt_takes_its_tag_from_the_file_name(tmp_path):
    path = tmp_path / "3d_spatial_val.txt"
    path.write_text("a cat on the left of a dog\n\n  a bird above a tree  \n")
    bench = load_benchmark(str(path))
    assert bench.format == "t2i-compbench"
    assert bench.records == [{"prompt": "a cat on the left of a dog", "tag": "3d_spatial"},
                             {"prompt": "a bird above a tree", "tag": "3d_spatial"}]
    assert not any(map(is_judgeable, bench.records))


def test_dpg_bench_csv_folds_propositions_into_one_record_per_item(tmp_path):
    path = tmp_path / "dpg_bench.csv"
    path.write_text(DPG_CSV)
    bench = load_benchmark(str(path))
    assert bench.format == "dpg-bench"
    assert bench.records == [
        {"prompt": "Eight cabbages, round and plump, in a field.", "id": "0", "tag": "entity",
         "categories": ["attribute", "entity", "other"]},
        {"prompt": "A red cup to the left of a blue plate.", "id": "COCOval2014000000010363", "tag": "entity",
         "categories": ["attribute", "entity", "relation"]},
    ]


def _write(tmp_path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize("name, text, expected", [
    ("prompts.yaml", "a: 1\n", r"prompts\.yaml: not a benchmark file; accepted suffixes: \.jsonl"),
    ("empty.txt", "\n\n", r"empty\.txt: the benchmark holds no prompts"),
    ("empty.jsonl", "", r"empty\.jsonl: the benchmark holds no prompts"),
    ("bad.jsonl", GENEVAL_LINES.splitlines()[0] + '\n{"tag": "colors", "include": [{"count": 1}], "prompt": "x"}\n',
     r"bad\.jsonl:2: include\[0\]\.class: missing"),
    ("no_category.csv", DPG_CSV.replace("category_broad", "broad"), r"no_category\.csv: missing column category_broad"),
    ("long_row.csv", DPG_CSV.splitlines()[0] + "\n" + DPG_CSV.splitlines()[1] + "\n1,x,,1,0,entity,a,b,c,EXTRA\n",
     r"long_row\.csv:3: 10 fields, the header has 9"),
    ("no_text.csv", DPG_CSV.splitlines()[0] + "\n7,,,1,0,entity,whole,t,q\n", r"no_text\.csv:2: text: missing"),
])
def test_bad_files_are_errors_naming_the_file(tmp_path, name, text, expected):
    with pytest.raises(SpatialScoreError, match=expected):
        load_benchmark(_write(tmp_path, name, text))


def test_unknown_names_and_missing_files_are_errors():
    with pytest.raises(SpatialScoreError, match=r"unknown benchmark 'shapes-shrt' \(did you mean 'shapes-short'\?\); "
                                                r"known: .*shapes-long"):
        load_benchmark("shapes-shrt")
    with pytest.raises(SpatialScoreError, match=r"nowhere/prompts\.jsonl: no such benchmark file"):
        load_benchmark("nowhere/prompts.jsonl")
