"""Public SD3 plumbing outside the reading path: SD3's tokenizers in plain Python.

    from sd3.tokenizers import CLIPTokenizer, T5Tokenizer
    clip = CLIPTokenizer.from_folder("stable-diffusion-3.5-medium/tokenizer") # vocab.json,
    merges.txt
    t5 = T5Tokenizer.from_file("stable-diffusion-3.5-medium/tokenizer_3") # spiece.model or
    tokenizer.json
    ids = clip(["a red fox in the snow"])                                        # (B, 77) int64

CLIP's byte-level BPE (open_clip's SimpleTokenizer and its text cleaning, minus
ftfy's mojibake repair) and T5's unigram SentencePiece (with the model's own
compiled normalisation rules, Viterbi, unknown runs merged as sentencepiece does).
"""
import base64
import html
import json
import math
import os
import struct
import unicodedata

import torch

from checkpoints import CheckpointError
from common import read_text


def bytes_to_unicode():
    """GPT-2's reversible map of the 256 byte values to printable characters (BPE then never sees a
    space or control)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    unseen = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(unseen)}}


def char_class(c):
    return "space" if c.isspace() else {"L": "letter",
                                        "N": "number"}.get(unicodedata.category(c)[0], "other")


# What ftfy.fix_text does to ordinary text before CLIP sees it (open_clip's cleaning): curly quotes
# become straight ones and Latin ligatures are spelled out; full-width forms are folded below by
# NFKC.
CLIP_FIXES = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "“": '"', "”": '"', "„": '"',
                            "‟": '"',
                            "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt",
                            "ﬆ": "st"})


def clean_clip_text(text):
    """open_clip's cleaning: ftfy's fixes for ordinary text, HTML entities undone (twice),
    whitespace collapsed, lower case. ftfy's repair of mis-decoded text (mojibake) is not
    reproduced."""
    text = unicodedata.normalize("NFC", text).translate(CLIP_FIXES)
    text = "".join(unicodedata.normalize("NFKC", c) if 0xFF01 <= ord(c) <= 0xFF5E or c == "\u3000"
                   else c for c in text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def clip_words(text):
    r"""CLIP's pre-tokenizer, the regex 's|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+
    written out: the same matches, first alternative first, without the `regex` package. A special
    token's text inside a prompt ("<|endoftext|>") is read as plain characters, as open_clip does
    (transformers' tokenizer would map it)."""
    words, i = [], 0
    while i < len(text):
        fixed = next((w for w in CONTRACTIONS if text.startswith(w, i)), None)
        kind = char_class(text[i])
        if fixed:
            end = i + len(fixed)
        elif kind == "space":
            i += 1
            continue
        elif kind == "number":
            end = i + 1
        else:  # a run of letters, or of anything that is neither letter, number nor space
            end = i + 1
            while end < len(text) and char_class(text[end]) == kind:
                end += 1
        words.append(text[i:end])
        i = end
    return words


def read_json_object(path):
    """A tokenizer's JSON file -> its object (dict); one line naming the file when it is not
    UTF-8, not JSON, or not an object."""
    try:
        value = json.loads(read_text(path, "tokenizer file"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not JSON ({e}); the tokenizer is damaged") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds {type(value).__name__}, expected a JSON object")
    return value


def read_merges(path):
    """merges.txt -> its BPE merges [[first, second], ...] in rank order (a '#version' line
    skipped)."""
    merges = []
    for number, line in enumerate(read_text(path, "tokenizer file").splitlines(), 1):
        if line.strip() and not line.startswith("#version"):
            if len(line.split()) != 2:
                raise CheckpointError(f"{path} line {number}: {line[:80]!r} is not a merge of "
                                      "two symbols")
            merges.append(line.split())
    return merges


class CLIPTokenizer:
    """Byte-level BPE (Radford et al. 2019, 2021) from a `tokenizer/` folder's vocab.json and
    merges.txt.

    __call__(prompts) -> ids (B, 77): start token, at most 75 tokens, end token, then `pad` (SD3's
    CLIP-L pads with the end token, CLIP-G with "!", id 0: read from the folder's
    special_tokens_map.json).
    """

    def __init__(self, vocab, merges, pad="<|endoftext|>", length=77):
        self.vocab, self.length = vocab, length
        self.ranks = {tuple(merge): rank for rank, merge in enumerate(merges)}
        missing = [t for t in ("<|startoftext|>", "<|endoftext|>", pad) if t not in vocab]
        if missing:
            raise CheckpointError(f"the CLIP vocabulary lacks {missing}: not a CLIP tokenizer's "
                                  "vocab.json")
        self.bos, self.eos, self.pad = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab[pad]
        self.byte_chars = bytes_to_unicode()
        self.cache = {}

    @classmethod
    def from_folder(cls, path, length=77):
        files = {name: os.path.join(path, name)
                 for name in ("vocab.json", "merges.txt", "special_tokens_map.json")}
        for name in ("vocab.json", "merges.txt"):
            if not os.path.exists(files[name]):
                raise CheckpointError(f"{path} has no {name}: point at a CLIP tokenizer folder "
                                      "(tokenizer/, tokenizer_2/)")
        vocab = read_json_object(files["vocab.json"])
        if not all(isinstance(token, str) and type(i) is int for token, i in vocab.items()):
            raise CheckpointError(f"{files['vocab.json']} is not a CLIP vocabulary: expected "
                                  "token: id pairs, each id an int")
        pad = "<|endoftext|>"
        if os.path.exists(files["special_tokens_map.json"]):
            pad = read_json_object(files["special_tokens_map.json"]).get("pad_token", pad)
            pad = pad.get("content") if isinstance(pad, dict) else pad
        try:
            return cls(vocab, read_merges(files["merges.txt"]), pad, length)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None

    def bpe(self, word):
        """Merge the word's adjacent symbols by rank, lowest first, until no pair is a merge; the
        last symbol ends in </w>."""
        if word not in self.cache:
            symbols = [*word[:-1], word[-1] + "</w>"]
            while len(symbols) > 1:
                pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, math.inf))
                if pair not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(symbols):
                    if tuple(symbols[i:i + 2]) == pair:
                        merged.append(symbols[i] + symbols[i + 1])
                        i += 2
                    else:
                        merged.append(symbols[i])
                        i += 1
                symbols = merged
            self.cache[word] = [self.vocab[s] for s in symbols]
        return self.cache[word]

    def encode(self, text):
        ids = [i for word in clip_words(clean_clip_text(text))
               for i in self.bpe("".join(self.byte_chars[b] for b in word.encode("utf-8")))]
        ids = [self.bos, *ids[:self.length - 2], self.eos]
        return ids + [self.pad] * (self.length - len(ids))

    def __call__(self, prompts):
        return torch.tensor([self.encode(p) for p in prompts])


def read_protobuf(data):
    """A protobuf message's fields -> [(field number, value)]: ints for varints, bytes for
    length-delimited."""
    fields, i = [], 0

    def varint():
        nonlocal i
        value, shift = 0, 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value
    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields.append((number, varint()))
        elif wire == 2:
            size = varint()
            fields.append((number, data[i:i + size]))
            i += size
        elif wire in (1, 5):  # fixed 64 / 32 bits
            width = 8 if wire == 1 else 4
            fields.append((number, data[i:i + width]))
            i += width
        else:
            raise ValueError(f"protobuf wire type {wire} is not one sentencepiece models use")
    return fields


class CharsMap:
    """sentencepiece's compiled normalisation rules (nmt_nfkc for T5: NFKC plus mapping tabs,
    newlines and zero-width characters to spaces, ...): a darts-clone double-array trie over UTF-8
    bytes whose leaves point into a blob of replacement strings. At each position the longest
    matching rule is applied."""

    def __init__(self, blob):
        size = struct.unpack("<I", blob[:4])[0]
        self.units = struct.unpack(f"<{size // 4}I", blob[4:4 + size])
        self.replacements = blob[4 + size:]

    @staticmethod
    def offset(unit):
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def longest_rule(self, data, start):
        """-> (bytes matched, replacement) of the longest rule matching data[start:]; (0, b"") if
        none."""
        node, found = self.offset(self.units[0]), (0, b"")
        for i in range(start, len(data)):
            node ^= data[i]
            unit = self.units[node]
            if unit & ((1 << 31) | 0xFF) != data[i]:
                # the unit's label is not this byte: no longer prefix
                break
            node ^= self.offset(unit)
            if unit >> 8 & 1:  # a rule ends here
                value = self.units[node] & ((1 << 31) - 1)
                found = (i + 1 - start,
                         self.replacements[value:self.replacements.index(b"\0", value)])
        return found

    def __call__(self, text):
        data, out, i = text.encode("utf-8"), [], 0
        while i < len(data):
            length, replacement = self.longest_rule(data, i)
            if not length:  # no rule: the character stays (its UTF-8 length from the lead byte)
                lead = data[i]
                length, replacement = 1 + (lead >= 0xC0) + (lead >= 0xE0) + (lead >= 0xF0), None
            out.append(data[i:i + length] if replacement is None else replacement)
            i += length
        return b"".join(out).decode("utf-8")


class T5Tokenizer:
    """Unigram SentencePiece (Kudo 2018) from `spiece.model` or `tokenizer.json`.

    Normalisation as sentencepiece: the model's compiled rules (CharsMap), runs of spaces to one, no
    space at either end, a space in front, spaces written "▁". Then the segmentation of highest
    total log-probability (Viterbi over the pieces); characters no piece covers become the unknown
    token, a run of them one. __call__(prompts) -> ids (B, length): the pieces, the end token </s>,
    `pad` (0) to `length` (SD3: 256).
    """

    def __init__(self, pieces, unk_id, eos_id, pad_id=0, charsmap=None, length=256):
        self.unk_id, self.eos_id, self.pad_id, self.length = unk_id, eos_id, pad_id, length
        self.charsmap = CharsMap(charsmap) if charsmap else str
        self.scores = {piece: (i, score) for i,
                       (piece, score) in enumerate(pieces) if piece is not None}
        # sentencepiece's kUnkPenalty
        self.unk_score = min(score for _, score in self.scores.values()) - 10.0
        self.longest = max(len(p) for p in self.scores)

    @classmethod
    def from_file(cls, path, length=256):
        """spiece.model (a folder holding it, or the file) or Hugging Face's tokenizer.json."""
        if os.path.isdir(path):
            for name in ("spiece.model", "tokenizer.json"):
                if os.path.exists(os.path.join(path, name)):
                    return cls.from_file(os.path.join(path, name), length)
            raise CheckpointError(f"{path} has no spiece.model or tokenizer.json: point at a T5 "
                                  "tokenizer (tokenizer_3/)")
        if not os.path.exists(path):
            raise CheckpointError(f"{path} does not exist: point at a T5 tokenizer (tokenizer_3/ "
                                  "or its spiece.model)")
        try:
            if path.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    spec = json.load(f)
                special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
                pieces = [(None if p in special else p, s) for p, s in spec["model"]["vocab"]]
                ids = {p: i for i, (p, _) in enumerate(spec["model"]["vocab"])}
                normalizers = spec.get("normalizer") or {}
                normalizers = normalizers.get("normalizers", [normalizers])
                charsmap = next((base64.b64decode(n["precompiled_charsmap"]) for n in normalizers
                                 if n.get("type") == "Precompiled"), None)
                return cls(pieces, spec["model"]["unk_id"], ids["</s>"], ids.get("<pad>", 0),
                           charsmap, length)
            with open(path, "rb") as f:
                model = read_protobuf(f.read())
            pieces, names, unk_id = [], {}, None
            for i, (_, message) in enumerate(m for m in model if m[0] == 1):  # field 1: the pieces
                piece = dict(read_protobuf(message))
                # 1 normal, 2 unknown, 3 control
                text, kind = piece[1].decode("utf-8"), piece.get(3, 1)
                unk_id = i if kind == 2 else unk_id
                names[text] = i
                score = struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
                pieces.append((text if kind not in (2, 3) else None, score))
            # field 3; its field 2: the rules
            normalizer = dict(read_protobuf(next((m for f, m in model if f == 3), b"")))
            return cls(pieces, unk_id, names["</s>"], names.get("<pad>", 0), normalizer.get(2),
                       length)
        # JSON, UTF-8 and protobuf errors included
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error) as e:
            message = f"{path} is not a T5 tokenizer: {type(e).__name__}: {e}"
            raise CheckpointError(message[:300]) from None

    def segment(self, text):
        """Viterbi: best[i] = the highest total score of any segmentation of text[:i]."""
        text = " ".join(w for w in self.charsmap(text).split(" ") if w)
        if not text:
            return []
        text = "▁" + text.replace(" ", "▁")
        best = [(0.0, 0, None)] + [(-math.inf, 0, None)] * len(text)   # (score, start, piece id)
        for start in range(len(text)):
            if best[start][0] == -math.inf:
                continue
            covered = False
            for end in range(start + 1, min(len(text), start + self.longest) + 1):
                entry = self.scores.get(text[start:end])
                if entry is not None:
                    covered |= end == start + 1
                    score = best[start][0] + entry[1]
                    if score > best[end][0]:
                        best[end] = (score, start, entry[0])
            if not covered and best[start][0] + self.unk_score > best[start + 1][0]:
                best[start + 1] = (best[start][0] + self.unk_score, start, self.unk_id)
        ids, end = [], len(text)
        while end > 0:
            _, start, piece = best[end]
            if not (piece == self.unk_id and ids and ids[-1] == self.unk_id):
                # a run of unknowns is one token
                ids.append(piece)
            end = start
        return ids[::-1]

    def encode(self, text):
        ids = self.segment(text)[:self.length - 1] + [self.eos_id]
        return ids + [self.pad_id] * (self.length - len(ids))

    def __call__(self, prompts):
        return torch.tensor([self.encode(p) for p in prompts])
