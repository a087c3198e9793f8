"""A fixed word-level tokenizer for the small shapes-world models: the shapes-world vocabulary, the words of every
phrasing template, and one token per letter for quoted sign text (so a model can compare letters with pixels).
Built in code, so it is identical on every machine and needs no file."""

from __future__ import annotations

import re
import string

import torch

from spatialscore.data import prompts as prompt_templates
from spatialscore.data.vocab import COLORS, COUNT_WORDS, RELATIONS, SHAPES

PAD, UNK, QUOTE_OPEN, QUOTE_CLOSE = "<pad>", "<unk>", "<q>", "</q>"
_WORD = re.compile(r'"[^"]*"|[a-z]+|\d+', re.I)
_EXTRA = """a an the of and with is are there also photo image picture showing simple drawing sign that says reading
board word written on it its side placed where can be found sits together has to left right above below over under
beneath higher up than top next near one two three four five""".split()


def _vocabulary() -> list[str]:
    words = set(_EXTRA) | set(SHAPES) | {s + "s" for s in SHAPES} | set(COLORS) | set(COUNT_WORDS.values())
    words |= {w for rel in RELATIONS for w in rel.split()}
    for templates in prompt_templates.TEMPLATES.values():
        for variants in templates.values():
            words |= {w.lower() for t in variants for w in re.findall(r"[a-zA-Z]+", re.sub(r"\{\w+\}", " ", t))}
    for phrases in prompt_templates.REL_PHRASES.values():
        words |= {w for variants in phrases.values() for p in variants for w in p.split()}
    words |= {w for s in prompt_templates.REL_SUFFIX.values() for w in s.split()}
    letters = [f"#{c}" for c in string.ascii_uppercase + string.digits]
    return [PAD, UNK, QUOTE_OPEN, QUOTE_CLOSE, *letters, *sorted(words)]


class ShapesTokenizer:
    def __init__(self):
        self.vocab = _vocabulary()
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def tokens(self, prompt: str) -> list[int]:
        ids = []
        for match in _WORD.findall(prompt):
            if match.startswith('"'):
                ids.append(self.index[QUOTE_OPEN])
                ids += [self.index.get(f"#{c.upper()}", self.index[UNK]) for c in match.strip('"') if not c.isspace()]
                ids.append(self.index[QUOTE_CLOSE])
            else:
                ids.append(self.index.get(match.lower(), self.index[UNK]))
        return ids or [self.index[UNK]]

    def letter_bag(self, prompts: list[str]) -> torch.Tensor:
        """[B, 36] multi-hot of the letters and digits quoted in each prompt (the text a sign should show)."""
        first = self.index["#A"]
        bag = torch.zeros(len(prompts), len(string.ascii_uppercase + string.digits))
        for i, prompt in enumerate(prompts):
            for token in self.tokens(prompt):
                if first <= token < first + bag.shape[1]:
                    bag[i, token - first] = 1
        return bag

    def __call__(self, prompts: list[str], max_len: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, T] right-padded, lengths [B])."""
        if isinstance(prompts, str):
            raise TypeError("ShapesTokenizer takes a list of prompts, not one string")
        rows = [self.tokens(p)[:max_len] for p in prompts]
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, lengths


class PromptEncoder(torch.nn.Module):
    """Word embeddings + a bidirectional GRU; the two final states, projected, encode the prompt."""

    def __init__(self, dim: int):
        super().__init__()
        self.tokenizer = ShapesTokenizer()
        self.embed = torch.nn.Embedding(len(self.tokenizer), dim, padding_idx=0)
        self.gru = torch.nn.GRU(dim, dim, batch_first=True, bidirectional=True)
        self.out = torch.nn.Linear(2 * dim, dim)

    def forward(self, prompts: list[str], device, words: bool = False):
        """The prompt vector [B, dim]; with words=True also (word vectors [B, T, dim], padding mask [B, T])."""
        ids, lengths = self.tokenizer(prompts)
        packed = torch.nn.utils.rnn.pack_padded_sequence(self.embed(ids.to(device)), lengths, batch_first=True,
                                                         enforce_sorted=False)
        seq, h = self.gru(packed)  # h: [2, B, dim], the last state of each direction
        pooled = torch.tanh(self.out(torch.cat([h[0], h[1]], dim=-1)))
        if not words:
            return pooled
        seq, _ = torch.nn.utils.rnn.pad_packed_sequence(seq, batch_first=True)
        mask = torch.arange(seq.shape[1])[None, :] < lengths[:, None]
        return pooled, torch.tanh(self.out(seq)), mask.to(device)
