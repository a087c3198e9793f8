"""The shapes-world reward backbone: a Relation Network (Santoro et al., 2017) over a grid of convolutional cells.

Generic transformers over patches stay at chance on this task for many minutes on a CPU; a model whose positions
are explicit and whose relations are pairwise learns in minutes (see the reward-model issue). Cells carry their
(x, y) centre; g(o_i, o_j, q) runs on every ordered pair of the most object-like cells with the prompt's encoding q,
the pair outputs are summed, and f maps the sum to the Gaussian head. g's first layer is split as
A o_i + B o_j + C q, so it costs O(cells) matmuls instead of O(cells^2); only the later layers run per pair.

Each clause kind also gets an explicit comparison, summed into a few evidence features that f reads (EVIDENCE),
because a plain MLP over pair features takes far longer to discover them:
- Relations: each pair of objects attends over the prompt's words with a subject query and an object query (plus a
  null word for pairs no clause ties) and turns the clause it finds into the displacement the prompt expects,
  antisymmetric by construction; measured against the pair's displacement it either agrees or contradicts. The
  queries see what an object is, never where it is: on faithful images the subject of "left of" is always the
  object on the left, and queries that saw positions learn that shortcut (swap and flip stay at chance).
- Bindings: the words each object attends to are read as the colour and class they ask for, compared with the
  colour and class the cell shows.
- Counts: the number of objects the prompt asks for (read from its encoding) against the objects the image holds.
- Text: letters are spotted on the quarter-resolution map (a glyph is ~9 px wide) and gathered over a row of cells
  (a sign is wider than a cell); the letters a sign shows are compared with the prompt's quoted letters.
With dense targets from the scene graphs every one of these readings is supervised — what the words ask of each
object of a faithful image is what that object is — so the preference loss only has to weigh the evidence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spatialscore.models.base import GaussianHead, RewardModel, register_arch
from spatialscore.data.targets import CELL_COLORS, CELL_SHAPES, LETTERS, RELATION_DIRECTIONS
from spatialscore.data.vocab import RELATIONS, SIGN_CLASS
from spatialscore.models.text import PromptEncoder

EVIDENCE = ("contradicted", "agreed", "wrong_color", "wrong_shape", "letters_not_asked", "letters_missing",
            "objects_extra", "objects_missing")
DEFAULTS = {"image_size": 128, "channels": 64, "grid": 8, "objects": 8, "text_dim": 128, "g_dim": 128, "f_dim": 128,
            "seed": 0}


def conv_trunk(channels: int, image_size: int, grid: int) -> nn.Sequential:
    """Stride-2 convolutions from image_size down to a grid x grid map of `channels` features."""

    def block(cin: int, cout: int, k: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride=2, padding=k // 2), nn.GroupNorm(8, cout), nn.ReLU())

    layers, side, width = [block(3, channels // 2, 5)], image_size // 2, channels // 2
    while side // 2 >= grid:
        layers.append(block(width, channels, 3))
        width, side = channels, side // 2
    if side != grid or width != channels:  # sizes that are not grid * 2^k: pool to the grid exactly
        layers += [block(width, channels, 3) if width != channels else nn.Identity(), nn.AdaptiveAvgPool2d(grid)]
    return nn.Sequential(*layers)


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images


class RelationReward(RewardModel):
    """Cells -> (auxiliary) per-cell colour, shape, offset and sign letters -> the `objects` most object-like cells
    -> g over all their ordered pairs with the prompt -> sum, with the clause evidence -> f -> Gaussian head."""

    arch = "relation"

    def __init__(self, config: dict):
        config = {**DEFAULTS, **config}
        super().__init__(config)
        torch.manual_seed(config["seed"])
        c, t, g = config["channels"], config["text_dim"], config["g_dim"]
        self.trunk = conv_trunk(c, config["image_size"], config["grid"])
        self.position_slice = slice(c, c + 2)  # where read_cells puts (x, y) in an object vector
        self.sign_index = c + 2 + len(CELL_COLORS) + len(CELL_SHAPES) - 1  # and P(this cell holds a sign)
        self.cell_heads = nn.Conv2d(c, len(CELL_COLORS) + len(CELL_SHAPES) + 2, 1)
        # letters are ~9 px wide: they are read off the quarter-resolution map, then gathered over a row of cells
        # (a sign is wider than a cell)
        self.letter_head = nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1), nn.ReLU(),
                                         nn.Conv2d(c // 2, len(LETTERS), 3, padding=1))
        self.text = PromptEncoder(t)
        obj = c + 2 + len(CELL_COLORS) + len(CELL_SHAPES) + len(LETTERS)  # features, position, and the cell reading
        q = t + len(LETTERS)  # the prompt's encoding and the letters it quotes
        self.g_first, self.g_second = nn.Linear(obj, g), nn.Linear(obj, g, bias=False)
        self.g_text = nn.Linear(q, g, bias=False)
        content = obj - 2 - len(LETTERS)  # what queries see of an object: not its position nor its letters
        # each object looks up the words that describe it; g sees both objects' readings (attribute binding)
        self.word_query = nn.Linear(content, t)
        self.g_word_first, self.g_word_second = nn.Linear(t, g, bias=False), nn.Linear(t, g, bias=False)
        # what those words ask of the object: a colour ("none" when they name none) and a class
        self.asked_color, self.asked_shape = nn.Linear(t, len(CELL_COLORS)), nn.Linear(t, len(CELL_SHAPES))
        self.asked_total = nn.Linear(q, 1)  # how many objects (signs included) the whole prompt asks for
        # the clause tying a pair, found by attention, becomes the displacement the prompt expects
        self.subject_query, self.object_query = nn.Linear(content, t), nn.Linear(content, t, bias=False)
        self.null_word = nn.Parameter(torch.zeros(t))
        self.expect = nn.Sequential(nn.Linear(3 * t, t), nn.ReLU(), nn.Linear(t, 2))
        # measured displacement, expected displacement and their product: "left of" is a sign test
        self.g_offset = nn.Linear(6, g, bias=False)
        self.g_letters = nn.Linear(2, g, bias=False)  # read letters not asked for, asked letters not read
        self.g_rest = nn.Sequential(nn.ReLU(), nn.Linear(g, g), nn.ReLU(), nn.Linear(g, g), nn.ReLU())
        # f also sees clause-level evidence summed over the objects: how much measured displacements contradict and
        # agree with the expected ones, colours and classes that differ from the asked ones, letter mismatches
        self.f = nn.Sequential(nn.Linear(g + q + len(EVIDENCE), config["f_dim"]), nn.ReLU())
        self.head = GaussianHead(config["f_dim"], config["f_dim"])

    def read_cells(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-cell object vectors [B, n, obj] and the raw per-cell predictions (logits) for the auxiliary loss."""
        quarter = self.trunk[:2](resize_to(images, self.config["image_size"]) * 2 - 1)  # [B, c, S/4, S/4]
        feats = self.trunk[2:](quarter)  # [B, c, G, G]
        b, _, gh, gw = feats.shape
        out = self.cell_heads(feats)
        nc, ns = len(CELL_COLORS), len(CELL_SHAPES)
        glyphs = self.letter_head(quarter)  # [B, 36, S/4, S/4]: is this letter drawn here?
        letters = F.adaptive_max_pool2d(glyphs, (gh, gw))
        pred = {"color": out[:, :nc], "shape": out[:, nc:nc + ns], "offset": out[:, nc + ns:], "glyphs": glyphs,
                "letters": F.max_pool2d(letters, (1, 5), stride=1, padding=(0, 2))}
        ys, xs = torch.meshgrid(torch.arange(gh, device=feats.device), torch.arange(gw, device=feats.device),
                                indexing="ij")
        centre = torch.stack([xs, ys]).float().add(0.5).expand(b, 2, gh, gw)
        # explicit positions: the cell's centre moved by the predicted offset, in [-1, 1] image units
        position = (centre + torch.tanh(pred["offset"])) / torch.tensor([gw, gh], device=feats.device).view(1, 2, 1, 1)
        objects = torch.cat([feats, position * 2 - 1, pred["color"].softmax(1), pred["shape"].softmax(1),
                             pred["letters"].sigmoid()], 1)
        return objects.flatten(2).transpose(1, 2), pred

    def select(self, objectness: torch.Tensor) -> torch.Tensor:
        """Indices [B, k] of the cells most likely to hold an object, from every cell's objectness [B, n]."""
        return objectness.topk(min(self.config["objects"] or objectness.shape[1], objectness.shape[1]), dim=1).indices

    def relate(self, objects: torch.Tensor, objectness: torch.Tensor, seen: torch.Tensor, prompts: list[str]):
        """(mu, sigma, readings) for the selected objects [B, k, obj] with their objectness [B, k], and `seen` [B],
        the number of objects in the whole image; readings hold what the words ask of each object and pair (logits,
        expected displacements) and of the image (the number of objects), for supervision."""
        b, k = objects.shape[:2]
        pooled, words, mask = self.text(prompts, objects.device, words=True)
        bag = self.text.tokenizer.letter_bag(prompts).to(objects.device)
        q = torch.cat([pooled, bag], -1)
        scale = words.shape[-1] ** -0.5
        # words are looked up by what an object is, never by where it is: on faithful images "the subject of
        # left of" is always the object on the left, and a query that saw positions would learn that shortcut.
        # Nor by the letters it shows: they are compared with the prompt's letters below, and are noise here
        # until the letter spotter has learned.
        content = torch.cat([objects[..., :self.position_slice.start],
                             objects[..., self.position_slice.stop:-len(LETTERS)]], -1)
        scores = self.word_query(content) @ words.transpose(1, 2) * scale  # [B, k, T]
        reading = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1) @ words  # [B, k, t]

        # the clause tying object i (subject) to object j: additive attention, so it costs O(k) matmuls
        clause_words = torch.cat([self.null_word.expand(b, 1, -1), words], 1)
        clause_mask = torch.cat([mask.new_ones(b, 1), mask], 1)
        subject = self.subject_query(content) @ clause_words.transpose(1, 2) * scale  # [B, k, T+1]
        obj = self.object_query(content) @ clause_words.transpose(1, 2) * scale
        pair_scores = (subject[:, :, None, :] + obj[:, None, :, :]).masked_fill(~clause_mask[:, None, None, :],
                                                                                float("-inf"))
        clause = pair_scores.softmax(-1) @ clause_words[:, None]  # [B, k, k, t]
        raw = self.expect(torch.cat([clause, reading[:, :, None].expand(-1, -1, k, -1),
                                     reading[:, None].expand(-1, k, -1, -1)], -1))
        expected = raw - raw.transpose(1, 2)  # A left of B is B right of A

        position = objects[..., self.position_slice]
        displacement = (position[:, :, None, :] - position[:, None, :, :]) * 4  # [B, k, k, 2]
        letters = objects[..., -len(LETTERS):]
        mismatch = torch.stack([(letters * (1 - bag[:, None])).sum(-1), ((1 - letters) * bag[:, None]).sum(-1)], -1)
        first = (self.g_first(objects)[:, :, None, :] + self.g_second(objects)[:, None, :, :]
                 + self.g_word_first(reading)[:, :, None, :] + self.g_word_second(reading)[:, None, :, :]
                 + self.g_letters(mismatch)[:, :, None, :]
                 + self.g_offset(torch.cat([displacement, expected, displacement * expected], -1))
                 + self.g_text(q)[:, None, None, :])
        pairs = self.g_rest(first).sum(dim=(1, 2)) / (k * k)

        readings = {"expected": expected, "color": self.asked_color(reading), "shape": self.asked_shape(reading),
                    "total": self.asked_total(q)[:, 0]}
        evidence = self.evidence(objects, objectness, readings, displacement, mismatch, seen)
        mu, sigma = self.head(self.f(torch.cat([pairs, q, evidence], dim=-1)))
        return mu, sigma, readings

    def evidence(self, objects, objectness, readings, displacement, mismatch, seen) -> torch.Tensor:
        """[B, len(EVIDENCE)]: each clause kind's agreement with the image, summed over the objects (weighted by
        how sure the model is that they are objects), so f need not discover these comparisons itself."""
        c, nc, ns = self.position_slice.stop, len(CELL_COLORS), len(CELL_SHAPES)
        seen_color, seen_shape = objects[..., c:c + nc], objects[..., c + nc:c + nc + ns]
        pair_weight = objectness[:, :, None] * objectness[:, None, :]
        agreement = (readings["expected"] * displacement).sum(-1) * pair_weight  # each clause as (i, j) and (j, i)
        asked_color = readings["color"].softmax(-1)[..., 1:]  # "none" asks nothing
        asked_shape = readings["shape"].softmax(-1)[..., 1:]
        per_object = torch.stack([(asked_color * (1 - seen_color[..., 1:])).sum(-1),
                                  (asked_shape * (1 - seen_shape[..., 1:])).sum(-1),
                                  *(mismatch * objects[..., self.sign_index, None]).unbind(-1)], -1)
        surplus = seen - readings["total"]
        return torch.cat([torch.stack([F.relu(-agreement).sum((1, 2)), F.relu(agreement).sum((1, 2))], -1) / 2,
                          (per_object * objectness[..., None]).sum(1),
                          torch.stack([F.relu(surplus), F.relu(-surplus)], -1)], -1)

    def forward(self, images: torch.Tensor, prompts: list[str], targets: dict | None = None):
        objects, pred = self.read_cells(images)
        every = 1 - pred["shape"].softmax(1)[:, 0].flatten(1)  # objectness of every cell: 1 - P(no object here)
        top = self.select(every.detach())
        mu, sigma, readings = self.relate(objects.gather(1, top[..., None].expand(-1, -1, objects.shape[-1])),
                                          every.gather(1, top), every.sum(1), prompts)
        if targets is None:
            return mu, sigma
        return mu, sigma, cell_loss(pred, targets) + reading_loss(readings, top, targets)


def balanced_mean(per_item: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over the positive items plus mean over the rest: rare positives weigh as much as the common case."""
    positive = positive.float()
    rest = 1 - positive
    return ((per_item * positive).sum() / positive.sum().clamp(min=1)
            + (per_item * rest).sum() / rest.sum().clamp(min=1))


def reading_loss(readings: dict[str, torch.Tensor], top: torch.Tensor, targets: dict[str, torch.Tensor]):
    """Supervise what the words ask of the selected objects, on faithful images only (in a perturbed image an
    object may no longer match the words of its entry): the colour and class of each object's entry, and for every
    pair the displacement the prompt asks for between their entries (zero where no relation ties them), and the
    number of objects the prompt asks for (what a faithful image holds)."""
    expected = readings["expected"]
    if "group" not in targets or "faithful" not in targets:
        return expected.sum() * 0
    faithful = targets["faithful"].bool()

    def at_selected(name: str) -> torch.Tensor:
        return targets[name].flatten(1).gather(1, top).long()[faithful]

    groups = at_selected("group")
    entry = groups > 0
    loss = (F.cross_entropy(readings["color"][faithful][entry], at_selected("asked_color")[entry], reduction="sum")
            + F.cross_entropy(readings["shape"][faithful][entry], at_selected("asked_shape")[entry], reduction="sum")
            ) / entry.sum().clamp(min=1)
    loss = loss + F.mse_loss(readings["total"][faithful], targets["items"][faithful].float(),
                             reduction="sum") / faithful.sum().clamp(min=1)

    relations = targets["relations"].long()[faithful]  # [b', R, 3]
    n_groups = int(torch.cat([groups.flatten(), relations.flatten(), groups.new_zeros(1)]).max()) + 1
    table = expected.new_zeros(len(groups), n_groups, n_groups, 2)
    rows, slots = (relations[..., 0] >= 0).nonzero(as_tuple=True)
    a, rel, c = relations[rows, slots].unbind(-1)
    directions = torch.tensor([RELATION_DIRECTIONS[r] for r in RELATIONS], device=expected.device)
    table[rows, a, c] = directions[rel]
    table[rows, c, a] = -directions[rel]
    wanted = table[torch.arange(len(groups), device=top.device)[:, None, None], groups[:, :, None],
                   groups[:, None, :]]
    error = ((expected[faithful] - wanted) ** 2).sum(-1)  # [b', k, k]
    return loss + balanced_mean(error, wanted.abs().sum(-1) > 0)


def cell_loss(pred: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Colour and shape cross-entropy, averaged separately over object cells and empty cells — most cells are
    empty, and a plain mean lets the model ignore the few that matter — plus, where there is an object, the
    offset regression; and sign letters, both where each glyph is drawn and, gathered, at the sign's cell."""
    color, shape = targets["color"].long(), targets["shape"].long()
    present = (shape > 0).float()
    loss = balanced_mean(F.cross_entropy(pred["color"], color, reduction="none"), present)
    loss = loss + balanced_mean(F.cross_entropy(pred["shape"], shape, reduction="none"), present)
    offset = torch.tanh(pred["offset"]).permute(0, 2, 3, 1)
    loss = loss + ((offset - targets["offset"]) ** 2).sum(-1).mul(present).sum() / present.sum().clamp(min=1)
    signs = shape == CELL_SHAPES.index(SIGN_CLASS)  # may select nothing: the loss is then 0, still in the graph
    shown = targets["letters"][signs].float()
    read = F.binary_cross_entropy_with_logits(pred["letters"].permute(0, 2, 3, 1)[signs], shown, reduction="none")
    return loss + glyph_loss(pred["glyphs"], targets["glyphs"]) + balanced_mean(read, shown)


def glyph_loss(logits: torch.Tensor, glyphs: torch.Tensor) -> torch.Tensor:
    """Letter spotting on the quarter-resolution map: each letter is wanted within one cell of its glyph's centre
    and nowhere else; drawn and not-drawn weigh the same (letters are a tiny share of the map)."""
    h, w = logits.shape[-2:]
    wanted = torch.zeros_like(logits)
    rows, slots = (glyphs[..., 2] >= 0).nonzero(as_tuple=True)
    x, y, letter = glyphs[rows, slots].unbind(-1)
    wanted[rows, letter.long(), (y * h).long().clamp(0, h - 1), (x * w).long().clamp(0, w - 1)] = 1
    wanted = F.max_pool2d(wanted, 3, stride=1, padding=1)
    return balanced_mean(F.binary_cross_entropy_with_logits(logits, wanted, reduction="none"), wanted)


@register_arch("relation")
def build(config: dict) -> RelationReward:
    return RelationReward(config)
