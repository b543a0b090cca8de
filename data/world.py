"""The CPU toy world: real MNIST digits, captions measured on them, a tiny vocabulary.

Everything the other files need to know about the toy data lives here:
- `load_digits()`: the 5,000 real digits, 28x28 padded to 32x32, in [-1, 1].
- `measure_attributes()`: stroke thickness and slant, measured by a fixed rule
  (below) on any batch of images, real or generated, so captions of the data and
  the judge's attribute check use the same ruler.
- `caption()`, `tokenize()`: prompts like "a thick 7 slanted right" and their ids;
  `TextEncoder`: the toy's text encoder, ids -> (context, pooled), SD3's interface.
- `HELDOUT_PROMPTS`, `split()`: ten (digit, thickness, slant) combinations never
  seen in training, and the train/test split of the images; `TRAIN_PROMPTS`:
  the other 80 full captions.

The attribute rule, on the ink mask `pixel > 0` (half intensity):
- thickness = 2 * area / perimeter, in pixels (a stroke of width w and length
  L >> w has area w L and perimeter about 2 L). Thin below 1.75, thick above
  2.15: the terciles of the 5,000 digits.
- slant = mu11 / mu02, the shear dx/dy of the intensity-weighted second moments
  with y pointing up (positive leans right). Left below 0, right above 0.25
  (about 14 degrees). MNIST leans right on average, so "upright" is 0..0.25.
"""
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError
from images import image_tensor, open_image

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
IMAGE_SIZE = 32
THICKNESS = ("thin", "regular", "thick")
SLANT = ("slanted left", "upright", "slanted right")
THICKNESS_EDGES = (1.75, 2.15)  # pixels, see the module docstring
SLANT_EDGES = (0.0, 0.25)       # dx/dy

# one held-out (thickness, slant) combination per digit, spread over all nine
HELDOUT_COMBOS = {d: divmod((4 * d + 1) % 9, 3) for d in range(10)}


def caption(digit, thickness=None, slant=None):
    """'a thick 7 slanted right'; an attribute left as None is not mentioned."""
    words = ["a"]
    if thickness is not None:
        words.append(THICKNESS[thickness])
    words.append(str(digit))
    if slant is not None:
        words.append(SLANT[slant])
    return " ".join(words)


HELDOUT_PROMPTS = [caption(d, *HELDOUT_COMBOS[d]) for d in range(10)]
# the other 80 full captions: what the DRM's preference pairs and the policy's rollouts are drawn
# from
TRAIN_PROMPTS = [p for p in (caption(d, t, s) for d in range(10) for t in range(len(THICKNESS))
                             for s in range(len(SLANT))) if p not in HELDOUT_PROMPTS]

# ----------------------------------------------------------------------------
# Tokenizer: one id per word, id 0 pads, id 1 starts every prompt (its hidden
# state becomes the pooled embedding, like CLIP's end token).
VOCAB = ["<pad>", "<start>", "a"] + [str(d) for d in range(10)] + ["thin", "regular", "thick",
    "slanted", "left", "upright", "right"]
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_TOKENS = 8


def tokenize(prompts):
    """List of prompts -> (B, MAX_TOKENS) int64 ids. Raises ValueError on unknown words."""
    ids = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().split()
        unknown = [w for w in words if w not in WORD_TO_ID]
        if unknown:
            raise UserError(f"prompt {prompt!r}: unknown word(s) {unknown}; the vocabulary is "
                            f"{VOCAB[2:]}")
        if len(words) + 1 > MAX_TOKENS:
            raise UserError(f"prompt {prompt!r} is longer than {MAX_TOKENS - 1} words")
        ids[row, : len(words) + 1] = torch.tensor([1] + [WORD_TO_ID[w] for w in words])
    return ids


def parse_prompt(prompt):
    """'a thick 7 slanted right' -> (7, 2, 2); attributes not named are None."""
    words = prompt.lower().split()
    digits = [w for w in words if w.isdigit()]
    if len(digits) != 1:
        raise UserError(f"prompt {prompt!r} must name exactly one digit")
    thickness = next((THICKNESS.index(w) for w in words if w in THICKNESS), None)
    phrase = " ".join(words)
    slant = next((i for i, s in enumerate(SLANT) if s in phrase), None)
    return int(digits[0]), thickness, slant


# ----------------------------------------------------------------------------
# The toy text encoder, with SD3's interface: tokens -> (context, pooled)


@dataclass
class TextConfig:
    vocab_size: int = 21
    max_tokens: int = 8
    context_dim: int = 64   # = DiTConfig.context_dim
    pooled_dim: int = 64    # = DiTConfig.pooled_dim
    depth: int = 2
    heads: int = 2


class TextEncoder(nn.Module):
    """Token embeddings and two pre-norm transformer layers: ids (B, L) from tokenize() ->
    context (B, L, Dc), pooled (B, Dp). pooled is a projection of the start token's final state (it
    attends to the whole prompt, as CLIP's end token does); padding is masked out."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.context_dim)
        self.position_embedding = nn.Parameter(torch.randn(cfg.max_tokens, cfg.context_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.context_dim, cfg.heads, 4 * cfg.context_dim,
                                           dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(cfg.context_dim)
        self.pooled_proj = nn.Linear(cfg.context_dim, cfg.pooled_dim)

    def forward(self, ids):
        h = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        h = self.final_norm(self.layers(h, src_key_padding_mask=(ids == 0)))  # (B, L, Dc)
        return h, self.pooled_proj(h[:, 0])


# ----------------------------------------------------------------------------
# Images and attributes

def load_digits():
    """-> images (5000, 1, 32, 32) float32 in [-1, 1], labels (5000,) int64."""
    path = os.path.join(DATA_DIR, "mnist.npz")
    if not os.path.exists(path):
        raise UserError(f"{path} is missing; rebuild it with data/build_mnist.py (see "
                        "data/README.md)")
    with np.load(path) as f:
        images = torch.from_numpy(f["images"]).float() / 127.5 - 1  # (N, 28, 28)
        labels = torch.from_numpy(f["labels"]).long()
    images = F.pad(images, (2, 2, 2, 2), value=-1.0).unsqueeze(1)  # (N, 1, 32, 32)
    return images, labels


def read_images(paths):
    """Grey image files (8 or 16 bits) -> (N, 1, H, W) in [-1, 1], each file read once; a file
    that is not an image, or of another size than most, is named."""
    cache = {}
    for path in paths:
        if path not in cache:
            cache[path] = image_tensor(open_image(path, "L"), 1)
    shape = Counter(image.shape for image in cache.values()).most_common(1)[0][0]
    for path, image in cache.items():
        if image.shape != shape:
            raise UserError(f"image {path} is {image.shape[1]}x{image.shape[2]} pixels, the others "
                            f"{shape[1]}x{shape[2]}: every image of a preference set has the "
                            "model's size")
    return torch.stack([cache[path] for path in paths])


def measure_attributes(images):
    """images (B, 1, H, W) in [-1, 1] -> thickness (B,) px, slant (B,) dx/dy, ink mass (B,)."""
    img = (images[:, 0].float() + 1) / 2                          # (B, H, W) in [0, 1]
    ink = (img > 0.5).float()
    area = ink.sum((1, 2))
    perimeter = ((ink[:, 1:] != ink[:, :-1]).sum((1, 2))
                 + (ink[:, :, 1:] != ink[:, :, :-1]).sum((1, 2)))
    thickness = 2 * area / perimeter.clamp(min=1)
    H, W = img.shape[1:]
    y_up = -torch.arange(H, dtype=img.dtype).view(1, H, 1)
    x = torch.arange(W, dtype=img.dtype).view(1, 1, W)
    mass = img.sum((1, 2)).clamp(min=1e-6)
    cx = (img * x).sum((1, 2)) / mass
    cy = (img * y_up).sum((1, 2)) / mass
    dx, dy = x - cx.view(-1, 1, 1), y_up - cy.view(-1, 1, 1)
    mu11 = (img * dx * dy).sum((1, 2)) / mass
    mu02 = (img * dy * dy).sum((1, 2)) / mass
    slant = mu11 / mu02.clamp(min=1e-6)
    return thickness, slant, img.sum((1, 2))


def attribute_classes(images):
    """images -> thickness class (B,), slant class (B,), indices into THICKNESS / SLANT."""
    thickness, slant, _ = measure_attributes(images)
    return (torch.bucketize(thickness, torch.tensor(THICKNESS_EDGES)),
            torch.bucketize(slant, torch.tensor(SLANT_EDGES)))


def split(labels, thickness_class, slant_class, test_fraction=0.1, seed=0):
    """-> (train, test) boolean masks. test: a random fraction of the images. train: the rest,
    less every image whose caption is a held-out combination (so no model trains on those
    prompts)."""
    heldout = torch.tensor([(int(t), int(s)) == HELDOUT_COMBOS[int(d)]
                            for d, t, s in zip(labels, thickness_class, slant_class)])
    g = torch.Generator().manual_seed(seed)
    test = torch.rand(len(labels), generator=g) < test_fraction
    return ~(heldout | test), test


def load_world():
    """The whole toy dataset: dict of images, labels, attribute classes, captions, train and test
    masks."""
    images, labels = load_digits()
    thickness_class, slant_class = attribute_classes(images)
    captions = [caption(int(d), int(t), int(s)) for d, t,
                s in zip(labels, thickness_class, slant_class)]
    train, test = split(labels, thickness_class, slant_class)
    return dict(images=images, labels=labels, thickness=thickness_class, slant=slant_class,
                captions=captions, train=train, test=test)
