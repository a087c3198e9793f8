"""The prompt writer: GenEval-style metadata plus an English sentence, for short, long and text prompts.

Short prompts use GenEval's six tags (single_object, two_object, counting, colors, position, color_attr); `text`
prompts ask for a sign with a word on it; `long` prompts hold 3-5 distinct objects tied by 2-4 relations, as in
the SpatialScore paper. Phrasings come in two disjoint template sets, "train" and "heldout", so a reward model can
be judged on wordings it never saw; `phrasing="all"` mixes both.
"""

from __future__ import annotations

import random

from spatialscore.data.vocab import CHROMATIC, COUNT_WORDS, RELATIONS, SHAPES, SIGN_CLASS, SIGN_WORDS
from spatialscore.errors import SpatialScoreError

SHORT_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TAGS = (*SHORT_TAGS, "text", "long")
STYLES = {"short": SHORT_TAGS, "long": ("long",), "text": ("text",), "mixed": TAGS}
PHRASINGS = ("train", "heldout", "all")
COLOR_NAMES = (*CHROMATIC, "black")

# Relation wordings: A <phrase> B.
REL_PHRASES = {
    "train": {"left of": ["left of", "to the left of"], "right of": ["right of", "to the right of"],
              "above": ["above", "over"], "below": ["below", "under"]},
    "heldout": {"left of": ["on the left side of"], "right of": ["on the right side of"],
                "above": ["higher up than"], "below": ["beneath"]},
}
# "B has A <suffix>" wordings of A rel B.
REL_SUFFIX = {"left of": "to its left", "right of": "to its right", "above": "above it", "below": "below it"}

TEMPLATES = {
    "train": {
        "object": ["a photo of {a}", "{a}", "an image of {a}"],
        "pair": ["a photo of {a} and {b}", "{a} and {b}", "an image with {a} and {b}"],
        "relation": ["a photo of {a} {rel} {b}", "{a} {rel} {b}", "there is {a} {rel} {b}"],
        "sign": ['a sign that says "{w}"', 'a sign reading "{w}"'],
        "clause": ["{A} is {rel} {B}", "{A} sits {rel} {B}"],
        "joiner": [". ", "; "],
    },
    "heldout": {
        "object": ["a picture showing {a}", "a simple drawing of {a}"],
        "pair": ["a picture showing {a} together with {b}"],
        "relation": ["a picture where {a} is placed {rel} {b}", "{b} with {a} {suffix}"],
        "sign": ['a board with the word "{w}" written on it'],
        "clause": ["{A} can be found {rel} {B}", "{B} has {A} {suffix}"],
        "joiner": [", and ", ". Also, "],
    },
}


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun(entry: dict) -> str:
    if entry["class"] == SIGN_CLASS:
        return "sign"
    return f"{entry['color']} {entry['class']}" if entry.get("color") else entry["class"]


def longest_chain(edges: list[tuple[int, str, int]]) -> int:
    """Most relations stacked along one axis ("a above b above c above d" is 3). Canvases are small: past 2, the
    objects rarely fit with clear margins, so the writer avoids such prompts."""
    before = []  # (smaller, larger) along each axis: x for left/right, y (down) for above/below
    for i, rel, j in edges:
        axis = "x" if rel in ("left of", "right of") else "y"
        before.append((axis, i, j) if rel in ("left of", "above") else (axis, j, i))
    depth: dict[tuple[str, int], int] = {}

    def chain(axis: str, node: int) -> int:
        if (axis, node) not in depth:
            depth[axis, node] = max((1 + chain(axis, b) for ax, a, b in before if ax == axis and a == node), default=0)
        return depth[axis, node]

    return max((chain(axis, a) for axis, a, _ in before), default=0)


def plural(shape: str) -> str:
    return shape + "s"


class PromptWriter:
    """Samples prompt metadata records. Deterministic given `rng`."""

    def __init__(self, rng: random.Random, phrasing: str = "train"):
        if phrasing not in PHRASINGS:
            raise SpatialScoreError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
        self.rng = rng
        self.sets = ["train", "heldout"] if phrasing == "all" else [phrasing]

    def _template(self, kind: str) -> str:
        return self.rng.choice([t for s in self.sets for t in TEMPLATES[s][kind]])

    def _rel(self, rel: str) -> str:
        return self.rng.choice([p for s in self.sets for p in REL_PHRASES[s][rel]])

    def _relation_text(self, template: str, a: str, rel: str, b: str) -> str:
        return template.format(a=a, b=b, A=a, B=b, rel=self._rel(rel), suffix=REL_SUFFIX[rel])

    def sample(self, style: str = "mixed", tag_weights: dict[str, float] | None = None) -> dict:
        """One prompt of a tag drawn from `style`, uniformly or by `tag_weights` (missing tags weigh 1)."""
        if style not in STYLES:
            raise SpatialScoreError(f"style must be one of {tuple(STYLES)}, got {style!r}")
        tags = STYLES[style]
        if tag_weights:
            tag = self.rng.choices(tags, weights=[tag_weights.get(t, 1.0) for t in tags])[0]
        else:
            tag = self.rng.choice(tags)
        return getattr(self, f"_{tag}")()

    def _single_object(self) -> dict:
        entry = {"class": self.rng.choice(SHAPES), "count": 1}
        return self._record("single_object", [entry], self._template("object").format(a=article(noun(entry))))

    def _colors(self) -> dict:
        entry = {"class": self.rng.choice(SHAPES), "count": 1, "color": self.rng.choice(COLOR_NAMES)}
        return self._record("colors", [entry], self._template("object").format(a=article(noun(entry))))

    def _two_object(self) -> dict:
        a, b = self.rng.sample(SHAPES, 2)
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        return self._record("two_object", include, self._template("pair").format(a=article(a), b=article(b)))

    def _color_attr(self) -> dict:
        (a, b), (ca, cb) = self.rng.sample(SHAPES, 2), self.rng.sample(COLOR_NAMES, 2)
        include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
        text = self._template("pair").format(a=article(noun(include[0])), b=article(noun(include[1])))
        return self._record("color_attr", include, text)

    def _counting(self) -> dict:
        shape, n = self.rng.choice(SHAPES), self.rng.randint(1, 5)
        color = self.rng.choice(COLOR_NAMES) if self.rng.random() < 0.5 else None
        entry = {"class": shape, "count": n, **({"color": color} if color else {})}
        words = " ".join(w for w in (COUNT_WORDS[n], color, shape if n == 1 else plural(shape)) if w)
        exclude = [{"class": shape, "count": n + 1, **({"color": color} if color else {})}]
        return self._record("counting", [entry], self._template("object").format(a=words), exclude=exclude)

    def _position(self) -> dict:
        coloured = self.rng.random() < 0.6
        if coloured:
            (ca, cb), a, b = self.rng.sample(COLOR_NAMES, 2), self.rng.choice(SHAPES), self.rng.choice(SHAPES)
            anchor, other = {"class": b, "count": 1, "color": cb}, {"class": a, "count": 1, "color": ca}
        else:
            a, b = self.rng.sample(SHAPES, 2)
            anchor, other = {"class": b, "count": 1}, {"class": a, "count": 1}
        rel = self.rng.choice(RELATIONS)
        other["position"] = [rel, 0]
        text = self._relation_text(self._template("relation"), article(noun(other)), rel, article(noun(anchor)))
        return self._record("position", [anchor, other], text)

    def _text(self) -> dict:
        word = self.rng.choice(SIGN_WORDS)
        sign = self._template("sign").format(w=word)
        if self.rng.random() < 0.4:
            return self._record("text", [{"class": SIGN_CLASS, "count": 1}], sign, text=[word])
        anchor = {"class": self.rng.choice(SHAPES), "count": 1, "color": self.rng.choice(COLOR_NAMES)}
        rel = self.rng.choice(RELATIONS)
        include = [anchor, {"class": SIGN_CLASS, "count": 1, "position": [rel, 0]}]
        text = self._relation_text(self._template("relation"), sign, rel, article(noun(anchor)))
        return self._record("text", include, text, text=[word])

    def _long(self) -> dict:
        """3-5 distinct coloured objects; a random tree of 2-4 relations over them."""
        n_obj = self.rng.randint(3, 5)
        n_rel = self.rng.randint(2, min(4, n_obj - 1))
        pairs = self.rng.sample([(s, c) for s in SHAPES for c in COLOR_NAMES], n_obj)
        include = [{"class": s, "count": 1, "color": c} for s, c in pairs]
        related = sorted(self.rng.sample(range(1, n_obj), n_rel))
        while True:
            edges = [(i, self.rng.choice(RELATIONS), self.rng.randrange(i)) for i in related]
            if longest_chain(edges) <= 2:
                break
        clauses, mentioned = [], set()
        for i, rel, j in edges:
            include[i]["position"] = [rel, j]
            a = "the " + noun(include[i]) if i in mentioned else article(noun(include[i]))
            b = "the " + noun(include[j]) if j in mentioned else article(noun(include[j]))
            mentioned |= {i, j}
            clause = self._relation_text(self._template("clause"), a, rel, b)
            clauses.append(clause[0].upper() + clause[1:])
        loose = [article(noun(include[k])) for k in range(n_obj) if k not in mentioned]
        text = clauses[0]
        for clause in clauses[1:]:
            joiner = self._template("joiner")
            text += joiner + (clause if joiner.endswith(". ") else clause[0].lower() + clause[1:])
        if loose:
            text += ". There is also " + " and ".join(loose)
        return self._record("long", include, text + ".")

    @staticmethod
    def _record(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None,
                text: list[str] | None = None) -> dict:
        record = {"prompt": prompt, "tag": tag, "include": include}
        if exclude:
            record["exclude"] = exclude
        if text:
            record["text"] = text
        return record


def make_prompts(n: int, seed: int, style: str = "mixed", phrasing: str = "train") -> list[dict]:
    writer = PromptWriter(random.Random(seed), phrasing)
    return [writer.sample(style) for _ in range(n)]

