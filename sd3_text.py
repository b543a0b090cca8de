"""Public SD3 plumbing outside the reading path: SD3's three text encoders.

    from sd3_text import load_clip, load_t5, sd3_prompt_embedding
    clip_l = load_clip("stable-diffusion-3.5-medium/text_encoder")      # or text_encoders/clip_l.safetensors
    clip_g = load_clip("stable-diffusion-3.5-medium/text_encoder_2")    # or text_encoders/clip_g.safetensors
    t5 = load_t5("stable-diffusion-3.5-medium/text_encoder_3")          # or text_encoders/t5xxl_fp16.safetensors
    context, pooled = sd3_prompt_embedding(clip_l(ids_l), clip_g(ids_g), t5(ids_t5))

SD3 (Esser et al. 2024, sec. 2.2 and appendix B.2) conditions on three
encoders: CLIP-L/14 and OpenCLIP bigG/14 give the penultimate layer's hidden
states (77 tokens) and a pooled, projected vector each; T5-XXL's encoder gives
its last hidden states. The two CLIPs' hidden states are concatenated (768 +
1280 = 2048 channels), zero-padded to T5's 4096 and put before T5's tokens;
the pooled vectors are concatenated (2048). T5 may be left out (zeros, as SD3
allows) to save 9.5 GB.

Both published layouts store these encoders under Hugging Face transformers'
key names (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
`encoder.block.0.layer.0.SelfAttention.q.weight`), possibly behind a prefix in
single-file checkpoints; the module names below are those keys. Widths, depths
and head counts come from the tensor shapes, with a diffusers folder's
config.json where shapes cannot tell (CLIP's head count and activation).
"""
import base64
import html
import json
import math
import os
import struct
import unicodedata
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import CheckpointError, assign_from_files, check_keys, read_safetensors_header
from model import RMSNorm, attention, gelu_tanh

# -----------------------------------------------------------------------------
# CLIP's text transformer (Radford et al. 2021): pre-LayerNorm, causal self-attention


@dataclass
class CLIPConfig:
    vocab_size: int = 49408
    max_tokens: int = 77
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    projection_dim: int = 768
    activation: str = "quick_gelu"   # OpenAI's CLIP-L; OpenCLIP bigG uses "gelu"
    eos_token_id: int = 49407


ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu, "gelu_new": gelu_tanh}


class CLIPAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, D // self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, is_causal=True))                       # each token sees its left


class CLIPLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.self_attn = CLIPAttention(cfg.dim, cfg.heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(cfg.dim, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, cfg.dim)
        self.activation = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(self.activation(self.mlp.fc1(self.layer_norm2(x))))


class CLIPTextEncoder(nn.Module):
    """ids (B, 77) -> (penultimate hidden states (B, 77, dim), pooled projection (B, projection_dim))."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.text_model.embeddings.position_embedding = nn.Embedding(cfg.max_tokens, cfg.dim)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.depth)])
        self.text_model.final_layer_norm = nn.LayerNorm(cfg.dim)
        self.text_projection = nn.Linear(cfg.dim, cfg.projection_dim, bias=False)

    def forward(self, ids):
        m = self.text_model
        x = m.embeddings.token_embedding(ids) + m.embeddings.position_embedding.weight[: ids.shape[1]]
        for layer in m.encoder.layers[:-1]:
            x = layer(x)
        penultimate = x                                                  # what SD3 conditions on
        last = m.final_layer_norm(m.encoder.layers[-1](x))
        eos = (ids == self.config.eos_token_id).int().argmax(1)         # the first end token: it has seen the prompt
        return penultimate, self.text_projection(last[torch.arange(len(ids)), eos])

# -----------------------------------------------------------------------------
# T5's encoder (Raffel et al. 2020; v1.1: gated GELU, no biases): RMS norms, relative position buckets


@dataclass
class T5Config:
    vocab_size: int = 32128
    dim: int = 4096
    depth: int = 24
    heads: int = 64
    head_dim: int = 64
    mlp_dim: int = 10240
    num_buckets: int = 32
    max_distance: int = 128


def relative_position_bucket(relative_position, num_buckets, max_distance):
    """Key minus query offset -> bucket (bidirectional): half the buckets per direction, exact below
    num_buckets / 4, then logarithmic up to max_distance."""
    num_buckets //= 2
    bucket = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    exact = num_buckets // 2
    log_bucket = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (num_buckets - exact)).long()
    return bucket + torch.where(distance < exact, distance, log_bucket.clamp(max=num_buckets - 1))


class T5Attention(nn.Module):
    def __init__(self, cfg, relative_bias):
        super().__init__()
        self.cfg = cfg
        inner = cfg.heads * cfg.head_dim
        self.q, self.k, self.v = (nn.Linear(cfg.dim, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.dim, bias=False)
        if relative_bias:  # only the first block learns the bias; every block adds it
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.heads)

    def position_bias(self, L, device):
        position = torch.arange(L, device=device)
        buckets = relative_position_bucket(position[None, :] - position[:, None], self.cfg.num_buckets,
                                           self.cfg.max_distance)                       # (L query, L key)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)      # (1, heads, L, L)

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.cfg.heads, self.cfg.head_dim) for proj in (self.q, self.k, self.v))
        # T5 does not scale q k^T by 1/sqrt(head_dim) (its init accounts for it): scale=1
        return self.o(attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0))


class T5Block(nn.Module):
    def __init__(self, cfg, relative_bias):
        super().__init__()
        self_attention, feed_forward = nn.Module(), nn.Module()  # T5's norms: RMSNorm, no mean, no bias
        self_attention.layer_norm, self_attention.SelfAttention = RMSNorm(cfg.dim), T5Attention(cfg, relative_bias)
        feed_forward.layer_norm, feed_forward.DenseReluDense = RMSNorm(cfg.dim), nn.Module()
        mlp = feed_forward.DenseReluDense
        mlp.wi_0, mlp.wi_1 = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False), nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        mlp.wo = nn.Linear(cfg.mlp_dim, cfg.dim, bias=False)
        self.layer = nn.ModuleList([self_attention, feed_forward])

    def forward(self, x, bias):
        self_attention, feed_forward = self.layer
        x = x + self_attention.SelfAttention(self_attention.layer_norm(x), bias)
        mlp, h = feed_forward.DenseReluDense, feed_forward.layer_norm(x)
        return x + mlp.wo(gelu_tanh(mlp.wi_0(h)) * mlp.wi_1(h))                      # gated GELU


class T5Encoder(nn.Module):
    """ids (B, L) -> last hidden states (B, L, dim)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList([T5Block(cfg, relative_bias=(i == 0)) for i in range(cfg.depth)])
        self.encoder.final_layer_norm = RMSNorm(cfg.dim)

    def forward(self, ids):
        x = self.shared(ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1], ids.device)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

# -----------------------------------------------------------------------------
# Tokenizers, in plain Python: CLIP's byte-level BPE and T5's unigram SentencePiece


def bytes_to_unicode():
    """GPT-2's reversible map of the 256 byte values to printable characters (BPE then never sees a space or control)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unseen = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(unseen)}}


def char_class(c):
    return "space" if c.isspace() else {"L": "letter", "N": "number"}.get(unicodedata.category(c)[0], "other")


# What ftfy.fix_text does to ordinary text before CLIP sees it (open_clip's cleaning): curly quotes become
# straight ones and Latin ligatures are spelled out; full-width forms are folded below by NFKC.
CLIP_FIXES = str.maketrans({"‘": "'", "’": "'", "‚": "'", "‛": "'", "“": '"', "”": '"', "„": '"', "‟": '"',
                            "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"})


def clean_clip_text(text):
    """open_clip's cleaning: ftfy's fixes for ordinary text, HTML entities undone (twice), whitespace
    collapsed, lower case. ftfy's repair of mis-decoded text (mojibake) is not reproduced."""
    text = unicodedata.normalize("NFC", text).translate(CLIP_FIXES)
    text = "".join(unicodedata.normalize("NFKC", c) if 0xFF01 <= ord(c) <= 0xFF5E or c == "\u3000" else c
                   for c in text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def clip_words(text):
    r"""CLIP's pre-tokenizer, the regex 's|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+ written out: the
    same matches, first alternative first, without the `regex` package. A special token's text inside a prompt
    ("<|endoftext|>") is read as plain characters, as open_clip does (transformers' tokenizer would map it)."""
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


class CLIPTokenizer:
    """Byte-level BPE (Radford et al. 2019, 2021) from a `tokenizer/` folder's vocab.json and merges.txt.

    __call__(prompts) -> ids (B, 77): start token, at most 75 tokens, end token, then `pad` (SD3's CLIP-L pads
    with the end token, CLIP-G with "!", id 0: read from the folder's special_tokens_map.json).
    """

    def __init__(self, vocab, merges, pad="<|endoftext|>", length=77):
        self.vocab, self.length = vocab, length
        self.ranks = {tuple(merge): rank for rank, merge in enumerate(merges)}
        missing = [t for t in ("<|startoftext|>", "<|endoftext|>", pad) if t not in vocab]
        if missing:
            raise CheckpointError(f"the CLIP vocabulary lacks {missing}: not a CLIP tokenizer's vocab.json")
        self.bos, self.eos, self.pad = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab[pad]
        self.byte_chars = bytes_to_unicode()
        self.cache = {}

    @classmethod
    def from_folder(cls, path, length=77):
        files = {name: os.path.join(path, name) for name in ("vocab.json", "merges.txt", "special_tokens_map.json")}
        for name in ("vocab.json", "merges.txt"):
            if not os.path.exists(files[name]):
                raise CheckpointError(f"{path} has no {name}: point at a CLIP tokenizer folder (tokenizer/, tokenizer_2/)")
        with open(files["vocab.json"], encoding="utf-8") as f:
            vocab = json.load(f)
        with open(files["merges.txt"], encoding="utf-8") as f:
            merges = [line.split() for line in f if line.strip() and not line.startswith("#version")]
        pad = "<|endoftext|>"
        if os.path.exists(files["special_tokens_map.json"]):
            with open(files["special_tokens_map.json"], encoding="utf-8") as f:
                pad = json.load(f).get("pad_token", pad)
            pad = pad["content"] if isinstance(pad, dict) else pad
        return cls(vocab, merges, pad, length)

    def bpe(self, word):
        """Merge the word's adjacent symbols by rank, lowest first, until no pair is a merge; the last symbol ends in </w>."""
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
    """A protobuf message's fields -> [(field number, value)]: ints for varints, bytes for length-delimited."""
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
            raise CheckpointError(f"protobuf wire type {wire} is not one sentencepiece models use")
    return fields


class CharsMap:
    """sentencepiece's compiled normalisation rules (nmt_nfkc for T5: NFKC plus mapping tabs, newlines and
    zero-width characters to spaces, ...): a darts-clone double-array trie over UTF-8 bytes whose leaves point
    into a blob of replacement strings. At each position the longest matching rule is applied."""

    def __init__(self, blob):
        size = struct.unpack("<I", blob[:4])[0]
        self.units = struct.unpack(f"<{size // 4}I", blob[4:4 + size])
        self.replacements = blob[4 + size:]

    @staticmethod
    def offset(unit):
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def longest_rule(self, data, start):
        """-> (bytes matched, replacement) of the longest rule matching data[start:]; (0, b"") if none."""
        node, found = self.offset(self.units[0]), (0, b"")
        for i in range(start, len(data)):
            node ^= data[i]
            unit = self.units[node]
            if unit & ((1 << 31) | 0xFF) != data[i]:  # the unit's label is not this byte: no longer prefix
                break
            node ^= self.offset(unit)
            if unit >> 8 & 1:  # a rule ends here
                value = self.units[node] & ((1 << 31) - 1)
                found = (i + 1 - start, self.replacements[value:self.replacements.index(b"\0", value)])
        return found

    def __call__(self, text):
        data, out, i = text.encode("utf-8"), [], 0
        while i < len(data):
            length, replacement = self.longest_rule(data, i)
            if not length:  # no rule: the character stays (its UTF-8 length from the lead byte)
                length, replacement = 1 + (data[i] >= 0xC0) + (data[i] >= 0xE0) + (data[i] >= 0xF0), None
            out.append(data[i:i + length] if replacement is None else replacement)
            i += length
        return b"".join(out).decode("utf-8")


class T5Tokenizer:
    """Unigram SentencePiece (Kudo 2018) from `spiece.model` or `tokenizer.json`.

    Normalisation as sentencepiece: the model's compiled rules (CharsMap), runs of spaces to one, no space at
    either end, a space in front, spaces written "▁". Then the segmentation of highest total log-probability
    (Viterbi over the pieces); characters no piece covers become the unknown token, a run of them one.
    __call__(prompts) -> ids (B, length): the pieces, the end token </s>, `pad` (0) to `length` (SD3: 256).
    """

    def __init__(self, pieces, unk_id, eos_id, pad_id=0, charsmap=None, length=256):
        self.unk_id, self.eos_id, self.pad_id, self.length = unk_id, eos_id, pad_id, length
        self.charsmap = CharsMap(charsmap) if charsmap else str
        self.scores = {piece: (i, score) for i, (piece, score) in enumerate(pieces) if piece is not None}
        self.unk_score = min(score for _, score in self.scores.values()) - 10.0  # sentencepiece's kUnkPenalty
        self.longest = max(len(p) for p in self.scores)

    @classmethod
    def from_file(cls, path, length=256):
        """spiece.model (a folder holding it, or the file) or Hugging Face's tokenizer.json."""
        if os.path.isdir(path):
            for name in ("spiece.model", "tokenizer.json"):
                if os.path.exists(os.path.join(path, name)):
                    return cls.from_file(os.path.join(path, name), length)
            raise CheckpointError(f"{path} has no spiece.model or tokenizer.json: point at a T5 tokenizer (tokenizer_3/)")
        if not os.path.exists(path):
            raise CheckpointError(f"{path} does not exist: point at a T5 tokenizer (tokenizer_3/ or its spiece.model)")
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
                return cls(pieces, spec["model"]["unk_id"], ids["</s>"], ids.get("<pad>", 0), charsmap, length)
            with open(path, "rb") as f:
                model = read_protobuf(f.read())
            pieces, names, unk_id = [], {}, None
            for i, (_, message) in enumerate(m for m in model if m[0] == 1):  # field 1: the pieces
                piece = dict(read_protobuf(message))
                text, kind = piece[1].decode("utf-8"), piece.get(3, 1)   # 1 normal, 2 unknown, 3 control
                unk_id = i if kind == 2 else unk_id
                names[text] = i
                pieces.append((text if kind not in (2, 3) else None, struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0))
            normalizer = dict(read_protobuf(next((m for f, m in model if f == 3), b"")))  # field 3; its field 2: the rules
            return cls(pieces, unk_id, names["</s>"], names.get("<pad>", 0), normalizer.get(2), length)
        except (ValueError, KeyError, IndexError, TypeError, struct.error) as e:  # JSON, UTF-8 and protobuf errors included
            raise CheckpointError(f"{path} is not a T5 tokenizer: {type(e).__name__}: {e}"[:300]) from None

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
            if not (piece == self.unk_id and ids and ids[-1] == self.unk_id):  # a run of unknowns is one token
                ids.append(piece)
            end = start
        return ids[::-1]

    def encode(self, text):
        ids = self.segment(text)[:self.length - 1] + [self.eos_id]
        return ids + [self.pad_id] * (self.length - len(ids))

    def __call__(self, prompts):
        return torch.tensor([self.encode(p) for p in prompts])

# -----------------------------------------------------------------------------
# SD3's prompt embedding


def sd3_prompt_embedding(clip_l, clip_g, t5=None, t5_dim=4096):
    """(hidden, pooled) of CLIP-L and CLIP-G, T5's hidden states (or None: zeros) -> context, pooled.

    context: [CLIP-L | CLIP-G | zeros to t5_dim] over the 77 CLIP tokens, then T5's tokens: (B, 77 + L_t5, 4096);
    pooled: [CLIP-L pooled | CLIP-G pooled]: (B, 2048).
    """
    clip = torch.cat([clip_l[0], clip_g[0]], dim=-1)
    clip = F.pad(clip, (0, t5_dim - clip.shape[-1]))
    if t5 is None:  # SD3 without T5: zeros in its place
        t5 = torch.zeros_like(clip)
    return torch.cat([clip, t5.to(clip.dtype)], dim=1), torch.cat([clip_l[1], clip_g[1]], dim=-1)

# -----------------------------------------------------------------------------
# Loading: a safetensors file (keys possibly behind a prefix) or a transformers folder with config.json


def _files_and_config(path, weights_name):
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no .safetensors file; point at a {weights_name} folder or file")
        config_path = os.path.join(path, "config.json")
        config = json.load(open(config_path)) if os.path.exists(config_path) else {}
        return files, config
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    return [path], {}


def _plan(files, anchor):
    """{our key: [entry]} from the files' headers, dropping any prefix before `anchor` (e.g. 'text_model.')."""
    plan = {}
    for file in files:
        for name, entry in read_safetensors_header(file)[0].items():
            if "embed_tokens" in name:  # T5's copy of `shared`, tied to it
                continue
            cut = name.find(anchor)
            if cut >= 0:
                plan[name[cut:]] = [entry]
            elif name.endswith("text_projection.weight") or name.endswith("shared.weight"):
                plan[name.split(".")[-2] + ".weight"] = [entry]
    return plan


def _load(model, plan, path, what, dtype, device):
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expected, {k: v[0].shape for k, v in plan.items() if k in expected}, path, what,
               [k for k in plan if k not in expected and "position_ids" not in k])
    return assign_from_files(model, {k: v for k, v in plan.items() if k in expected}, None, dtype, device)


def load_clip(path, dtype=None, device=None):
    """CLIP-L or CLIP-G text encoder with its projection, from either layout -> CLIPTextEncoder in eval mode."""
    files, hf = _files_and_config(path, "text_encoder")
    plan = _plan(files, "text_model.")
    shapes = {k: v[0].shape for k, v in plan.items()}
    if "text_model.embeddings.token_embedding.weight" not in shapes or "text_projection.weight" not in shapes:
        raise CheckpointError(f"{path} is not a CLIP text encoder with a projection ({len(shapes)} of its tensors have CLIP names)")
    vocab, dim = shapes["text_model.embeddings.token_embedding.weight"]
    cfg = CLIPConfig(
        vocab_size=vocab, dim=dim, max_tokens=shapes["text_model.embeddings.position_embedding.weight"][0],
        depth=1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("text_model.encoder.layers.")),
        heads=hf.get("num_attention_heads", dim // 64), mlp_dim=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        projection_dim=shapes["text_projection.weight"][0],
        activation=hf.get("hidden_act", "quick_gelu" if dim == 768 else "gelu"),  # CLIP-L 768 wide, bigG 1280
        eos_token_id=hf.get("eos_token_id", vocab - 1))
    with torch.device("meta"):
        model = CLIPTextEncoder(cfg)
    return _load(model, plan, path, f"a CLIP text encoder, {cfg}", dtype, device).eval()


def load_t5(path, dtype=None, device=None):
    """T5's encoder (v1.1, gated GELU) from either layout -> T5Encoder in eval mode."""
    files, hf = _files_and_config(path, "text_encoder_3")
    plan = _plan(files, "encoder.")
    shapes = {k: v[0].shape for k, v in plan.items()}
    bias_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if bias_key not in shapes or "shared.weight" not in shapes:
        raise CheckpointError(f"{path} is not a T5 encoder ({len(shapes)} of its tensors have T5 encoder names)")
    num_buckets, heads = shapes[bias_key]
    inner, dim = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"]
    cfg = T5Config(vocab_size=shapes["shared.weight"][0], dim=dim, heads=heads, head_dim=inner // heads,
                   depth=1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block.")),
                   mlp_dim=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0], num_buckets=num_buckets,
                   max_distance=hf.get("relative_attention_max_distance", 128))
    with torch.device("meta"):
        model = T5Encoder(cfg)
    return _load(model, plan, path, f"a T5 encoder, {cfg}", dtype, device).eval()
