"""The simulated annotator: a gold score per image and noisy Bradley-Terry preference labels.

    python -m data.judge # trains the digit classifier, writes data/judge.safetensors (~3 min)

Policies and the DRM never see the gold score, only pair labels drawn from it;
evaluation reads it on held-out prompts and seeds.

gold(image, prompt) = fidelity + attributes + perceptual, with
- fidelity   = log p(prompted digit | image) from a small CNN trained on the
               real training digits, floored at -10;
- attributes = for each attribute the prompt names, minus how far the measured
               value (data/world.py's rule) lies outside the prompted class's
               interval, in units of 0.4 px (thickness) or 0.25 (slant); 0 inside;
- perceptual = - 2.0 * blur    (mean of 4 p (1 - p) over the ink region p > 0.1:
                                 grey mush instead of clean strokes)
               - 0.05 * specks (ink pixels outside the largest 8-connected blob)
               - 0.2 * off-centre distance of the ink's centre of mass, in px.
A real test digit scores about -1.1 on average (blur 0.43, specks 0.44, off-centre 0.76 px);
a wrong or unreadable digit about -10 or below.

Pair labels: P(a preferred to b) = sigmoid((gold_a - gold_b) / temperature),
the Bradley-Terry model, so close pairs get noisy labels as human ones do.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import load_module, read_checkpoint, save_checkpoint
from data.world import (DATA_DIR, SLANT_EDGES, THICKNESS_EDGES, load_world, measure_attributes,
                        parse_prompt)

JUDGE_PATH = os.path.join(DATA_DIR, "judge.safetensors")
ATTRIBUTE_SCALE = {"thickness": 0.4, "slant": 0.25}
WEIGHTS = {"blur": 2.0, "specks": 0.05, "off_centre": 0.2}


class DigitClassifier(nn.Module):
    """Two conv stages (3x3 convs, ReLU, max-pool) and an MLP: (B, 1, 32, 32) in [-1, 1] -> (B, 10)
    logits."""

    def __init__(self):
        super().__init__()
        def stage(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
                    nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.net = nn.Sequential(*stage(1, 32), *stage(32, 64), nn.Flatten(),
                                 nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


def random_shift(x, max_shift=2):
    """Translate each image by up to max_shift pixels (background -1), so the classifier tolerates
    off-centre samples."""
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(torch.randint(0, 2 * max_shift + 1, (len(x), 2)).tolist()):
        out[i] = padded[i, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
    return out


def train_classifier(epochs=8, batch_size=64, lr=1e-3, seed=0):
    """Train on the real training digits (everything but the test split); -> (classifier, test
    accuracy)."""
    torch.manual_seed(seed)
    world = load_world()
    train_x, train_y = world["images"][~world["test"]], world["labels"][~world["test"]]
    test_x, test_y = world["images"][world["test"]], world["labels"][world["test"]]
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(train_x)).split(batch_size):
            loss = F.cross_entropy(model(random_shift(train_x[idx])), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        accuracy = test_accuracy(model, test_x, test_y)
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, accuracy on {len(test_y)} real test "
              f"digits {accuracy:.2%}")
    return model.eval(), accuracy


@torch.no_grad()
def test_accuracy(model, images, labels):
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def load_classifier(path=JUDGE_PATH):
    tensors, meta = read_checkpoint(path)
    return load_module(DigitClassifier(), tensors, "classifier", path).eval()

# -----------------------------------------------------------------------------
# Perceptual terms


def largest_blob_mask(ink):
    """ink (B, H, W) bool -> mask of the largest 8-connected component, by label propagation with
    max-pool."""
    B, H, W = ink.shape
    numbers = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W).expand(B, H, W)
    labels = torch.where(ink, numbers, torch.zeros(()))
    for _ in range(H * W):
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * ink
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.view(B, -1).long()
    sizes = torch.zeros(B, H * W + 1).scatter_add_(1, flat,
                                                   torch.ones_like(flat, dtype=torch.float32))
    sizes[:, 0] = 0  # background
    return labels == sizes.argmax(1).view(B, 1, 1)


def perceptual_terms(images):
    """images (B, 1, H, W) in [-1, 1] -> dict of (B,) tensors: blur, specks, off_centre."""
    p = ((images[:, 0].float() + 1) / 2).clamp(0, 1)                     # (B, H, W)
    region = p > 0.1
    blur = (4 * p * (1 - p) * region).sum((1, 2)) / region.sum((1, 2)).clamp(min=1)
    ink = p > 0.5
    specks = (ink & ~largest_blob_mask(ink)).sum((1, 2)).float()
    H, W = p.shape[1:]
    mass = p.sum((1, 2)).clamp(min=1e-6)
    cy = (p * torch.arange(H).view(1, H, 1)).sum((1, 2)) / mass
    cx = (p * torch.arange(W).view(1, 1, W)).sum((1, 2)) / mass
    off_centre = torch.sqrt((cy - (H - 1) / 2) ** 2 + (cx - (W - 1) / 2) ** 2)
    return {"blur": blur, "specks": specks, "off_centre": off_centre}


def interval_distance(value, edges, cls):
    """How far value lies outside the interval of class cls given sorted inner edges (0 inside)."""
    bounds = [-float("inf"), *edges, float("inf")]
    lo, hi = bounds[cls], bounds[cls + 1]
    return (lo - value).clamp(min=0) + (value - hi).clamp(min=0)

# -----------------------------------------------------------------------------
# The judge


class Judge:
    """gold(images, prompts) and the Bradley-Terry pair labeller, around the trained classifier."""

    def __init__(self, classifier=None, temperature=1.0):
        self.classifier = classifier if classifier is not None else load_classifier()
        self.temperature = temperature

    @torch.no_grad()
    def score(self, images, prompts):
        """-> dict of (B,) tensors: gold and its parts, plus digit_correct and attribute_match (0/1
        each)."""
        images = images.float().cpu()
        parsed = [parse_prompt(p) for p in prompts]
        digits = torch.tensor([d for d, _, _ in parsed])
        log_probs = F.log_softmax(self.classifier(images), dim=1)
        fidelity = log_probs[torch.arange(len(images)), digits].clamp(min=-10)
        thickness, slant, _ = measure_attributes(images)
        attributes = torch.zeros(len(images))
        matched, named = torch.zeros(len(images)), torch.zeros(len(images))
        for i, (_, t_cls, s_cls) in enumerate(parsed):
            measured = ((t_cls, thickness[i], THICKNESS_EDGES, ATTRIBUTE_SCALE["thickness"]),
                        (s_cls, slant[i], SLANT_EDGES, ATTRIBUTE_SCALE["slant"]))
            for cls, value, edges, scale in measured:
                if cls is not None:
                    distance = interval_distance(value, edges, cls)
                    attributes[i] -= distance / scale
                    matched[i] += float(distance == 0)
                    named[i] += 1
        terms = perceptual_terms(images)
        perceptual = -sum(WEIGHTS[k] * terms[k] for k in WEIGHTS)
        return {"gold": fidelity + attributes + perceptual, "fidelity": fidelity,
                "attributes": attributes, "perceptual": perceptual, **terms,
                "digit_correct": (log_probs.argmax(1) == digits).float(),
                "attribute_match": matched / named.clamp(min=1)}

    def gold(self, images, prompts):
        return self.score(images, prompts)["gold"]

    def label_pairs(self, gold_a, gold_b, generator=None):
        """Bradley-Terry labels: -> (a_wins (B,) bool, confidence P(a preferred) (B,))."""
        p_a = torch.sigmoid((gold_a - gold_b) / self.temperature)
        return torch.rand(p_a.shape, generator=generator) < p_a, p_a


def main():
    torch.set_num_threads(1)
    classifier, accuracy = train_classifier()
    save_checkpoint(JUDGE_PATH, {"classifier": classifier},
                    {"kind": "judge", "test_accuracy": accuracy})
    world = load_world()
    test_x, test_captions = world["images"][world["test"]], [c for c,
        t in zip(world["captions"], world["test"]) if t]
    scores = Judge(classifier).score(test_x, test_captions)
    print(f"wrote {JUDGE_PATH}: test accuracy {accuracy:.2%}; on real test digits with their own "
          f"captions: mean gold {scores['gold'].mean():.3f}, attribute match "
          f"{scores['attribute_match'].mean():.2%}, "
          + ", ".join(f"{k} {scores[k].mean():.3f}"
                      for k in ("fidelity", "attributes", "blur", "specks", "off_centre")))


if __name__ == "__main__":
    main()
