"""The toy world and the simulated annotator, each checked against a reference computed another
way."""
import math
from collections import deque

import pytest
import torch
from conftest import within

from common import UserError
from data.judge import Judge, interval_distance, largest_blob_mask, load_classifier
from data.world import (HELDOUT_PROMPTS, SLANT, THICKNESS, caption, load_world, measure_attributes,
                        parse_prompt, tokenize)


def bar(width, length, shear=0.0, size=32):
    """A white bar on black, `width` px wide and `length` px tall, its x shifted by `shear` px per
    px of height."""
    img = -torch.ones(1, 1, size, size)
    top = (size - length) // 2
    for row in range(top, top + length):
        height_above_centre = (size - 1) / 2 - row  # y points up
        left = round(size / 2 - width / 2 + shear * height_above_centre)
        img[0, 0, row, left:left + width] = 1.0
    return img


@pytest.mark.parametrize("width, length", [(1, 20), (2, 16), (3, 20), (4, 12)])
def test_thickness_of_an_upright_bar_is_its_area_over_half_perimeter(width, length):
    thickness, slant, _ = measure_attributes(bar(width, length))
    expected = 2 * width * length / (2 * width + 2 * length)
    within(abs(thickness.item() - expected) / expected, 1e-6, "thickness, relative")
    within(abs(slant.item()), 1e-6, "slant")


@pytest.mark.parametrize("shear", [-0.5, -0.25, 0.2, 0.5])
def test_slant_of_a_sheared_bar_is_its_shear(shear):
    _, slant, _ = measure_attributes(bar(3, 20, shear))
    # pixel rounding of the edges (the drawing's, not floating-point rounding)
    assert slant.item() == pytest.approx(shear, abs=0.03)


def test_captions_round_trip_and_unknown_words_fail_clearly():
    for digit in range(10):
        for t in (None, 0, 1, 2):
            for s in (None, 0, 1, 2):
                assert parse_prompt(caption(digit, t, s)) == (digit, t, s)
    assert len(THICKNESS) == len(SLANT) == 3
    with pytest.raises(UserError, match="purple"):
        tokenize(["a purple 7"])
    ids = tokenize(["a thick 7 slanted right", ""])
    assert ids[0, 0] == 1 and (ids[0, 6:] == 0).all() and ids[1].tolist() == [1] + [0] * 7


def test_heldout_prompts_never_appear_in_training_and_splits_are_disjoint():
    world = load_world()
    train_captions = {c for c, keep in zip(world["captions"], world["train"]) if keep}
    assert not train_captions & set(HELDOUT_PROMPTS)
    assert not (world["train"] & world["test"]).any()
    # every held-out combination exists among the real digits, so the prompts are realistic
    all_captions = set(world["captions"])
    assert set(HELDOUT_PROMPTS) <= all_captions
    # the stored captions are the rule applied to the stored images
    thickness, slant, _ = measure_attributes(world["images"][:50])
    for i in range(50):
        _, t, s = parse_prompt(world["captions"][i])
        assert interval_distance(thickness[i], (1.75, 2.15), t) == 0
        assert interval_distance(slant[i], (0.0, 0.25), s) == 0


def test_interval_distance_by_hand():
    edges = (1.0, 2.0)
    assert interval_distance(torch.tensor(0.5), edges, 0) == 0
    for value, cls, expected in ((0.5, 1, 0.5), (2.75, 1, 0.75), (0.25, 2, 1.75)):
        distance = interval_distance(torch.tensor(value), edges, cls).item()
        within(abs(distance - expected) / expected, 1e-6, f"distance of {value} from class {cls}")


def bfs_components(ink):
    """Reference: breadth-first search over 8-neighbours; -> list of component masks."""
    H, W = ink.shape
    seen = torch.zeros_like(ink)
    components = []
    for y in range(H):
        for x in range(W):
            if ink[y, x] and not seen[y, x]:
                mask, queue = torch.zeros_like(ink), deque([(y, x)])
                seen[y, x] = True
                while queue:
                    cy, cx = queue.popleft()
                    mask[cy, cx] = True
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < H and 0 <= nx < W and ink[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                queue.append((ny, nx))
                components.append(mask)
    return components


def test_largest_blob_matches_breadth_first_search():
    g = torch.Generator().manual_seed(0)
    ink = torch.rand(12, 16, 16, generator=g) < 0.35
    ours = largest_blob_mask(ink)
    for i in range(len(ink)):
        components = bfs_components(ink[i])
        largest = max(int(c.sum()) for c in components)
        # ours is one of the components, and one of the largest (ties may pick either)
        assert any(torch.equal(ours[i], c) for c in components)
        assert int(ours[i].sum()) == largest


@pytest.fixture(scope="module")
def judge():
    return Judge(load_classifier())


def test_shipped_classifier_reads_real_test_digits(judge):
    world = load_world()
    images, labels = world["images"][world["test"]], world["labels"][world["test"]]
    with torch.no_grad():
        accuracy = (judge.classifier(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.97


def test_gold_prefers_the_right_digit_and_clean_strokes(judge):
    world = load_world()
    images, captions = world["images"][:64], world["captions"][:64]
    right = judge.gold(images, captions)
    wrong = judge.gold(images,
                       [c.replace(str(d), str((d + 1) % 10)) for c,
                        d in zip(captions, world["labels"][:64].tolist())])
    assert (right > wrong).float().mean() > 0.95
    # grey mush: the same digits at half contrast lose the blur term, nothing else changes much
    blurred = judge.score(images * 0.5, captions)
    assert (blurred["blur"] > judge.score(images, captions)["blur"]).all()
    # a speck far from the digit costs points
    specked = images.clone()
    specked[:, :, 1, 1] = 1.0
    assert (judge.score(specked, captions)["specks"] >= judge.score(images,
                                                                    captions)["specks"] + 1).all()


def test_bradley_terry_preference_rate_is_sigmoid_of_the_gap():
    # the labeller needs no classifier
    judge = Judge(classifier=torch.nn.Identity(), temperature=0.5)
    g = torch.Generator().manual_seed(0)
    n = 40000
    for gap in (-2.0, -0.5, 0.0, 0.3, 1.5):
        a_wins, confidence = judge.label_pairs(torch.full((n,), gap), torch.zeros(n), generator=g)
        expected = 1 / (1 + math.exp(-gap / 0.5))
        within(abs(confidence[0].item() - expected) / expected, 1e-6,
               f"confidence at gap {gap}, relative")
        # binomial standard error at n = 40000 is at most 0.0025: sampling, not rounding
        assert a_wins.float().mean().item() == pytest.approx(expected, abs=0.01)
