"""Preference pairs, read and checked: the JSONL records data/preferences.py writes, and HPDv3's
JSON lists (prompt, path1 the preferred image, path2, and confidence or choice_dist, model1, model2,
gold)."""
import json
import os

import torch

from common import UserError, read_text


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
            or not all(isinstance(n, (int, float)) and n >= 0 for n in choice_dist)
            or sum(choice_dist) <= 0):
        raise UserError(f"{where}: choice_dist {choice_dist!r} is not two vote counts [path1, "
                        f"path2]")
    return choice_dist[0] / sum(choice_dist)


def read_pairs(path):
    """-> list of dicts with prompt, path1 (the preferred image), path2 (paths relative to the
    file's folder, made absolute), confidence (HPDv3: given, or path1's share of choice_dist, else
    1), gold (or None), model1 and model2 (HPDv3: the models that made the two images, or None).
    Validated pair by pair."""
    if not os.path.exists(path):
        raise UserError(f"preference file {path} does not exist; make one with python -m "
                        f"data.preferences")
    folder = os.path.dirname(os.path.abspath(path))
    pairs = []
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected an object with prompt, path1, path2")
        missing = [k for k in ("prompt", "path1", "path2") if k not in record]
        if missing:
            raise UserError(f"{where}: missing field(s) {missing}")
        confidence = record.get("confidence", choice_share(record.get("choice_dist"), where))
        if not isinstance(confidence, (int, float)) or not 0.0 <= confidence <= 1.0:
            raise UserError(f"{where}: confidence {confidence!r} is not a number in [0, 1]")
        for key in ("model1", "model2"):
            if not isinstance(record.get(key, ""), str):
                raise UserError(f"{where}: {key} {record[key]!r} is not a model name")
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
                        f"model")
    return pairs


def gold_scores(pairs):
    """(N, 2) gold scores of path1 and path2 when every pair has them (the toy's), else None."""
    return torch.tensor([p["gold"] for p in pairs]) if all(p["gold"] is not None
                                                           for p in pairs) else None

