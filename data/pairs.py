"""Preference pairs: read and checked (the JSONL records data/preferences.py writes, and HPDv3's
JSON lists: prompt, path1 the preferred image, path2, and confidence or choice_dist, model1, model2,
gold), as the tensors a DRM trains on (Pairs, load_split), and the DRM's pairwise accuracy on them
by sigma (evaluate), pair by pair (pair_margins, gold_outcomes).
"""
import json
import os
from dataclasses import dataclass

import torch

from checkpoints import is_number
from common import UserError, flag, read_text
from model import add_noise

CLOSE_GAP = 0.1  # gold gap under which a pair counts as close


@dataclass
class PairFlags:
    """train_reward.py's flags of how the pairs are read (its Config holds them as one group)."""
    # train only on pairs whose confidence is at least this (the DRM repository's loader: 0.95);
    # evaluation keeps every pair
    min_confidence: float = flag(0.0, "[0, 1]", zero="every pair")
    # SD3: crop (the shorter side to --resolution, the centre) | stretch (to a square, the DRM
    # repository's); mode (the posterior mean) | sample (a draw each use); T5's padded length
    image_resize: str = flag("crop", choices=("crop", "stretch"))
    vae_latents: str = flag("mode", choices=("mode", "sample"))
    t5_tokens: int = flag(256, "[1, inf)")


def read_records(path):
    """JSON lines, or (HPDv3's train.json) one JSON list -> [(where, record)]."""
    text = read_text(path, "preference file")
    if path.endswith(".json"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not JSON ({e})") from None
        if not isinstance(records, list):
            raise UserError(f"{path}: expected a JSON list of pairs")
        return [(f"{path} pair {number}", record) for number, record in enumerate(records, 1)]
    lines = [(f"{path} line {number}", line) for number,
             line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for where, line in lines:
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e})") from None
    return records


def choice_share(choice_dist, where):
    """HPDv3's choice_dist [annotators who chose path1, who chose path2] -> path1's share (1 when
    absent)."""
    if choice_dist is None:
        return 1.0
    if (not isinstance(choice_dist, list) or len(choice_dist) != 2
            or not all(is_number(n) and n >= 0 for n in choice_dist) or sum(choice_dist) <= 0):
        raise UserError(f"{where}: choice_dist {choice_dist!r} is not two vote counts [path1, "
                        "path2]")
    return choice_dist[0] / sum(choice_dist)


def check_fields(record, where):
    """A record's fields of the right types and shapes -> its confidence (HPDv3: given, or path1's
    share of choice_dist, else 1)."""
    missing = [k for k in ("prompt", "path1", "path2") if k not in record]
    if missing:
        raise UserError(f"{where}: missing field(s) {missing}")
    for key in ("prompt", "path1", "path2"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise UserError(f"{where}: {key} {record[key]!r} is not a non-empty string")
    gold = record.get("gold")
    if gold is not None and not (isinstance(gold, list) and len(gold) == 2
                                 and all(is_number(g) for g in gold)):
        raise UserError(f"{where}: gold {gold!r} is not two finite scores [path1, path2]")
    confidence = record.get("confidence", choice_share(record.get("choice_dist"), where))
    if not is_number(confidence) or not 0.0 <= confidence <= 1.0:
        raise UserError(f"{where}: confidence {confidence!r} is not a number in [0, 1]")
    for key in ("model1", "model2"):
        if not isinstance(record.get(key, ""), str):
            raise UserError(f"{where}: {key} {record[key]!r} is not a model name")
    return confidence


def read_pairs(path):
    """-> list of dicts with prompt, path1 (the preferred image), path2 (paths relative to the
    file's folder, made absolute), confidence (HPDv3: given, or path1's share of choice_dist, else
    1), gold (or None), model1 and model2 (HPDv3: the models that made the two images, or None).
    Validated pair by pair."""
    if not os.path.exists(path):
        raise UserError(f"preference file {path} does not exist; make one with python -m "
                        "data.preferences")
    folder = os.path.dirname(os.path.abspath(path))
    pairs = []
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected an object with prompt, path1, path2")
        confidence = check_fields(record, where)
        for key in ("path1", "path2"):
            record[key] = os.path.join(folder, record[key])
            if not os.path.isfile(record[key]):
                problem = ("is a folder, not an image" if os.path.isdir(record[key])
                           else "does not exist")
                raise UserError(f"{where}: image {record[key]} {problem}")
        pairs.append({"prompt": record["prompt"], "path1": record["path1"],
                      "path2": record["path2"],
                      "confidence": float(confidence), "gold": record.get("gold"),
                      "model1": record.get("model1"), "model2": record.get("model2")})
    if not pairs:
        raise UserError(f"{path} holds no pairs: an empty split cannot train or evaluate a reward "
                        "model")
    return pairs


def gold_scores(pairs):
    """(N, 2) gold scores of path1 and path2 when every pair has them (the toy's), else None."""
    return torch.tensor([p["gold"] for p in pairs]) if all(p["gold"] is not None
                                                           for p in pairs) else None

# -----------------------------------------------------------------------------
# As tensors, and the DRM's accuracy


@dataclass
class Pairs:
    """A split's preference pairs as tensors: path1 (the labelled winner) and path2 of each, its
    prompt, and (the toy) the two gold scores, which only evaluation reads. Embeddings are kept
    once per distinct prompt, and on the CPU (a batch's go to the device)."""
    winners: torch.Tensor       # (N, C, H, W)
    losers: torch.Tensor        # (N, C, H, W)
    prompt: torch.Tensor        # (N,): each pair's row of context and pooled
    context: torch.Tensor       # (P, L, context_dim), P distinct prompts
    pooled: torch.Tensor        # (P, pooled_dim)
    gold: torch.Tensor | None   # (N, 2) or None
    # SD3, --vae_latents=sample: the posteriors' stds (winners', losers')
    stds: tuple | None = None

    def images(self, rows, generator=None):
        """The (winners, losers) of `rows`: the posterior means, or a draw from each posterior."""
        chosen = [self.winners[rows], self.losers[rows]]
        if self.stds is not None:
            chosen = [mean + std[rows] * torch.randn(mean.shape, generator=generator).to(mean)
                      for mean, std in zip(chosen, self.stds)]
        return chosen

    def text(self, rows, device):
        """(context, pooled) of the pairs `rows` (a tensor or a slice) on `device`."""
        index = self.prompt[rows]
        return self.context[index].to(device), self.pooled[index].to(device)


def split_file(prefs, split):
    """A split's file under --prefs: split.jsonl (ours), else HPDv3's split.json."""
    path = os.path.join(prefs, split + ".jsonl")
    return path[:-1] if not os.path.exists(path) and os.path.exists(path[:-1]) else path


def load_split(cfg, split, base, text, device):
    """A split's Pairs as the base model takes them (the toy: its images; SD3: their VAE latents,
    cached in out_dir/cache); training pairs below --min_confidence are dropped. cfg:
    train_reward.py's (--prefs, --out_dir and its PairFlags, cfg.pairs)."""
    path, flags = split_file(cfg.prefs, split), cfg.pairs
    pairs = read_pairs(path)
    if split == "train" and flags.min_confidence > 0:
        kept = [pair for pair in pairs if pair["confidence"] >= flags.min_confidence]
        print(f"--min_confidence={flags.min_confidence}: {len(kept)} of {len(pairs)} pairs kept")
        if not kept:
            raise UserError(f"--min_confidence={flags.min_confidence} leaves none of the "
                            f"{len(pairs)} pairs of {path}")
        pairs = kept
    (winners, losers), stds = base.pair_tensors(pairs, os.path.join(cfg.out_dir, "cache"),
                                                flags.image_resize)
    if flags.vae_latents == "mode":
        stds = None
    distinct = sorted({pair["prompt"] for pair in pairs})  # each prompt encoded once
    base.prepare(distinct, os.path.join(cfg.out_dir, "cache"), text)  # SD3: embedded once, cached
    row = {prompt: i for i, prompt in enumerate(distinct)}
    context, pooled = text.encode(distinct)
    rows = torch.tensor([row[pair["prompt"]] for pair in pairs])
    return Pairs(winners.to(device), losers.to(device), rows, context.cpu(), pooled.cpu(),
                 gold_scores(pairs), stds and tuple(t.to(device) for t in stds))


def evaluate(drm, pairs, sigmas, noise_draws=4, seed=1234, batch=256):
    """Pairwise accuracy on the test pairs at each (label, sigma) of `sigmas`, against the labels
    and (the toy) gold -> {label: figures}. A non-finite score makes the accuracies NaN: the run
    stops, nothing saved."""
    margins = pair_margins(drm, pairs, sigmas, noise_draws, seed, batch)
    return {label: accuracy(margin, pairs.gold) for label, margin in margins.items()}


@torch.no_grad()
def pair_margins(drm, pairs, sigmas, noise_draws=4, seed=1234, batch=256):
    """-> {label: each pair's score margin, winner's minus loser's (N,)} at each (label, sigma) of
    `sigmas`, averaged over `noise_draws` noisings; the same noise for any DRM (seeded), so two
    DRMs compare pair by pair. Measured in eval mode (no dropout), the DRM's mode restored after
    (a training run's goes on training; --eval_only's scores on in eval mode)."""
    training = drm.training
    drm.eval()
    device, n = pairs.winners.device, len(pairs.winners)
    g = torch.Generator().manual_seed(seed)
    margins = {}
    for label, sigma_value in sigmas:
        margin = margins[label] = torch.zeros(n)
        for _ in range(noise_draws):
            for i in range(0, n, batch):
                w, l = pairs.images(slice(i, i + batch), g)
                sigma = torch.full((len(w),), sigma_value, device=device)
                x = torch.cat([add_noise(w, sigma, torch.randn(w.shape, generator=g).to(device)),
                               add_noise(l, sigma, torch.randn(l.shape, generator=g).to(device))])
                text = (torch.cat([t] * 2) for t in pairs.text(slice(i, i + batch), device))
                rewards = drm(x, torch.cat([sigma, sigma]), *text).float().cpu()
                margin[i:i + len(w)] += (rewards[:len(w)] - rewards[len(w):]) / noise_draws
    drm.train(training)
    return margins


def gold_outcomes(margin, gold):
    """Each pair's outcome against the gold ordering, one character a pair: "1" the DRM orders it
    as gold does, "0" the other way, "-" gold ties it (no order to agree with)."""
    first, tied = margin > 0, gold[:, 0] == gold[:, 1]
    return "".join("-" if t else "01"[int(f == (a > b))]
                   for f, t, (a, b) in zip(first.tolist(), tied.tolist(), gold.tolist()))


def accuracy(margin, gold=None):
    """A margin's (N,) accuracy against the labels (the winner first) and, given gold (N, 2),
    against gold's ordering, on all pairs and on the close ones -> figures."""
    first = margin > 0
    nan = 0.0 if torch.isfinite(margin).all() else float("nan")
    result = {"label_accuracy": first.float().mean().item() + nan}
    if gold is not None:
        not_tied, close = gold[:, 0] != gold[:, 1], (gold[:, 0] - gold[:, 1]).abs() < CLOSE_GAP
        right = (first == (gold[:, 0] > gold[:, 1])) & not_tied  # agrees with gold's order
        result["gold_accuracy"] = (right.sum() / not_tied.sum()).item() + nan
        result["gold_accuracy_close_pairs"] = ((right & close).sum().item() + nan
                                               ) / max(1, (close & not_tied).sum().item())
    return result
