"""The DRM: its loss, its relation to the DiT it is cut from, that it learns, and its input
checks."""
import json
import math
import os

import pytest
import torch
from conftest import max_abs, within
from PIL import Image

import train_reward
from common import UserError, with_flags
from data.pairs import read_pairs
from model import DiTConfig, build_dit
from reward import DRM, bradley_terry_loss, read_drm, save_drm
from rivals.reward import thurstone_loss

SMALL = DiTConfig(in_channels=1, out_channels=1, patch_size=4, dim=64, depth=4, heads=2,
                  context_dim=16, pooled_dim=16, pos_embed_max_size=4, qk_norm=True)


def inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 1, 16, 16, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, 3, 16, generator=g), torch.randn(batch, 16, generator=g))


@pytest.mark.ex2_drm
def test_bradley_terry_loss_by_hand():
    win, lose = torch.tensor([2.0, -1.0, 0.0, 5.0]), torch.tensor([1.0, 1.0, 0.0, -3.0])
    expected = torch.tensor([math.log(1 + math.exp(-(w - l))) for w,
                             l in zip(win.tolist(), lose.tolist())])
    within(max_abs(bradley_terry_loss(win, lose), expected), 1e-6, "loss")


def test_drm_reproduces_the_dits_hidden_tokens():
    dit = build_dit(SMALL)
    with torch.no_grad():  # random, so the adaLN-zero gates do not make every block the identity
        for p in dit.parameters():
            p.normal_(0, 0.1)
    drm = DRM.from_dit(dit, drop_last=1)
    x, sigma, context, pooled = inputs()
    with torch.no_grad():
        ours, c_ours = drm.hidden_tokens(x, sigma, context, pooled)
        theirs, c_theirs = dit.features(x, sigma, context, pooled, num_blocks=SMALL.depth - 1)
    assert torch.equal(ours, theirs) and torch.equal(c_ours, c_theirs)
    # a copy
    assert drm.backbone.x_embedder.proj.weight.data_ptr() != dit.x_embedder.proj.weight.data_ptr()


@pytest.mark.ex2_drm
def test_gradients_reach_backbone_and_head():
    drm = DRM.from_scratch(SMALL, drop_last=2)
    with torch.no_grad():
        for p in drm.backbone.parameters():
            p.normal_(0, 0.1)
    drm(*inputs()).sum().backward()
    assert drm.backbone.joint_blocks[0].x_block.attn.qkv.weight.grad.abs().sum() > 0
    assert drm.backbone.x_embedder.proj.weight.grad.abs().sum() > 0
    assert drm.head.mlp[-1].weight.grad.abs().sum() > 0


@pytest.mark.ex2_drm
@pytest.mark.parametrize("loss_name", ["bt", "thurstone"])
def test_drm_learns_a_separable_pair_set(loss_name):
    """Winners are bright squares, losers dark ones: a few steps reach 100% at low noise, with
    either loss."""
    torch.manual_seed(0)
    drm = DRM.from_scratch(SMALL, drop_last=2).train()
    n = 32
    winners = -torch.ones(n, 1, 16, 16)
    winners[:, :, 4:12, 4:12] = 1.0
    losers = -torch.ones(n, 1, 16, 16)
    _, _, context, pooled = inputs(n)
    optimizer = torch.optim.AdamW(drm.parameters(), lr=1e-3)
    for _ in range(40):
        sigma = torch.rand(n) * 0.5
        rewards = drm(torch.cat([winners, losers]), torch.cat([sigma, sigma]),
                      torch.cat([context] * 2), torch.cat([pooled] * 2))
        win, lose = rewards.chunk(2)
        loss = (bradley_terry_loss(win, lose) if loss_name == "bt"
                else thurstone_loss(win, lose, sigma)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    drm.eval()
    with torch.no_grad():
        sigma = torch.full((n,), 0.25)
        win, lose = drm(torch.cat([winners, losers]), torch.cat([sigma, sigma]),
                        torch.cat([context] * 2), torch.cat([pooled] * 2)).chunk(2)
    assert (win > lose).all()


def write_prefs(folder, lines, make_images=True):
    os.makedirs(folder / "images", exist_ok=True)
    if make_images:
        for name in ("a.png", "b.png"):
            Image.new("L", (32, 32)).save(folder / "images" / name)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


GOOD = {"prompt": "a 7", "path1": "images/a.png", "path2": "images/b.png", "confidence": 0.8}


@pytest.mark.parametrize("bad, says", [
    ({**GOOD, "path2": "images/missing.png"}, "line 2: image .*missing.png does not exist"),
    ({**GOOD, "confidence": 1.7}, "line 2: confidence 1.7 is not a number in \\[0, 1\\]"),
    ({"prompt": "a 7", "path1": "images/a.png"}, "line 2: missing field"),
])
def test_bad_preference_lines_are_named(tmp_path, bad, says):
    path = write_prefs(tmp_path, [GOOD, bad])
    with pytest.raises(UserError, match=says):
        read_pairs(path)


def test_empty_split_is_refused(tmp_path):
    with pytest.raises(UserError, match="holds no pairs"):
        read_pairs(write_prefs(tmp_path, []))


def test_bad_flag_values_are_refused_before_work():
    with pytest.raises(UserError, match="--init=random: choose one of pretrained, scratch"):
        train_reward.main(train_reward.Config(init="random"))


@pytest.mark.ex2_drm
def test_token_head_scores_the_mean_hidden_token_and_survives_a_checkpoint(tmp_path):
    """The head ablation: LayerNorm and MLP on the mean of the last kept block's image tokens, no
    final layer."""
    drm = DRM.from_scratch(SMALL, drop_last=1, head="token").eval()
    x, sigma, context, pooled = inputs()
    with torch.no_grad():
        tokens, _ = drm.hidden_tokens(x, sigma, context, pooled)
        mean = tokens.mean(1)
        normed = (mean - mean.mean(1, keepdim=True)) / torch.sqrt(mean.var(1, unbiased=False,
                                                                           keepdim=True) + 1e-5)
        expected = drm.head.mlp(normed * drm.head.norm.weight + drm.head.norm.bias).squeeze(1)
        within(max_abs(drm(x, sigma, context, pooled), expected), 1e-5, "score")
    save_drm(str(tmp_path / "drm.safetensors"), drm, step=1, meta={})
    again, meta, _ = read_drm(str(tmp_path / "drm.safetensors"))
    assert meta["head"] == "token" and isinstance(again.head, type(drm.head))
    with torch.no_grad():
        assert torch.equal(again(x, sigma, context, pooled), drm(x, sigma, context, pooled))
    with pytest.raises(ValueError,
                       match="head=.mlp.: choose one of conv, 2BConvGN, 7BConvGN, token"):
        DRM.from_scratch(SMALL, head="mlp")


def test_training_sigma_follows_the_chosen_density():
    torch.manual_seed(0)
    logit = torch.logit(train_reward.training_sigma("logit_normal", 20000, "cpu"))
    # sampling, not rounding (these and the uniform checks below)
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03      # sigmoid of N(0, 1), SD3's
    uniform = train_reward.training_sigma("uniform", 20000, "cpu")
    assert (0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
            and abs(uniform.var() - 1 / 12) < 0.003)
    assert torch.equal(train_reward.training_sigma("zero", 5, "cpu"), torch.zeros(5))


def test_hpdv3_fields_and_the_confidence_threshold(tmp_path):
    """HPDv3's records may give choice_dist (votes for path1, path2) in place of confidence and name
    the two models;
    --min_confidence drops the training pairs below it, as the DRM repository's loader does, and no
    test pair."""
    from data.toy import ToyBase
    lines = [{**GOOD, "confidence": 0.97, "model1": "sd3", "model2": "flux"},
             {k: v for k, v in GOOD.items() if k != "confidence"} | {"choice_dist": [3, 1]},
             {k: v for k, v in GOOD.items() if k != "confidence"},
             {**GOOD, "confidence": 0.96}]
    path = write_prefs(tmp_path, lines)
    pairs = read_pairs(path)
    assert [p["confidence"] for p in pairs] == [0.97, 0.75, 1.0, 0.96]
    assert (pairs[0]["model1"], pairs[0]["model2"], pairs[1]["model1"]) == ("sd3", "flux", None)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({**line, "gold": [0.1, 0.0]}) + "\n"
                                                 for line in lines))
    base = ToyBase.load("data/base.safetensors", "cpu")
    cfg = with_flags(train_reward.Config(), prefs=str(tmp_path), min_confidence=0.965)
    # 0.97 and 1.0 (none given)
    assert len(train_reward.load_split(cfg, "train", base, base.text, "cpu").winners) == 2
    assert len(train_reward.load_split(cfg, "test", base, base.text, "cpu").winners) == 4
    write_prefs(tmp_path, [lines[0], lines[3]])
    with pytest.raises(UserError, match="--min_confidence=0.99 leaves none of the 2 pairs"):
        train_reward.load_split(with_flags(train_reward.Config(), prefs=str(tmp_path),
                                           min_confidence=0.99),
                                "train", base, base.text, "cpu")
    for bad, says in (([3], "choice_dist \\[3\\] is not two vote counts"),
                      ([0, 0], "is not two vote counts")):
        write_prefs(tmp_path,
                    [{k: v for k, v in GOOD.items() if k != "confidence"} | {"choice_dist": bad}])
        with pytest.raises(UserError, match=says):
            read_pairs(path)
    write_prefs(tmp_path, [{**GOOD, "model1": 7}])
    with pytest.raises(UserError, match="model1 7 is not a model name"):
        read_pairs(path)


@pytest.mark.ex2_drm
def test_a_drm_evaluation_keeps_each_pairs_outcome_and_they_add_up_to_its_accuracy(tmp_path):
    """train_reward.py --eval_only keeps each test pair's outcome against gold in eval.json (for
    bench/drm_table.py's paired comparison): one character a pair, "-" where gold ties it, and at
    every sigma their mean over the pairs gold orders is the accuracy it reports."""
    from common import run_main
    from data.pairs import gold_outcomes
    from data.world import TRAIN_PROMPTS
    # by hand: margins > 0 say "the winner first"; gold says which is better, or ties
    margin = torch.tensor([1.0, -1.0, 2.0, 0.0])
    gold = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert gold_outcomes(margin, gold) == "100-"
    # the margins are measured without a graph (6,400 test pairs' would fill the memory)
    from data.pairs import Pairs, pair_margins

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(1, 1, 4, 4))

        def forward(self, x, sigma, context, pooled):
            return (x * self.weight).flatten(1).sum(1)
    images = torch.randn(2, 3, 1, 4, 4)
    pairs = Pairs(images[0], images[1], torch.zeros(3, dtype=torch.long), torch.zeros(1, 1, 2),
                  torch.zeros(1, 2), gold=None)
    drm = Linear().eval()
    margins = pair_margins(drm, pairs, [("0", 0.0), ("0.5", 0.5)], noise_draws=2)
    assert set(margins) == {"0", "0.5"} and not any(m.requires_grad for m in margins.values())
    # and leave the DRM as it found it: --eval_only's candidate ranking scores next, in eval mode
    # (it once ran with the head's dropout on)
    assert not drm.training and pair_margins(drm.train(), pairs, [("0", 0.0)]) and drm.training
    folder = tmp_path / "prefs"
    os.makedirs(folder / "images")
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = (torch.rand(32, 32, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
    with open(folder / "test.jsonl", "w") as f:
        for j in range(12):  # two prompts, gold in either order, one pair tied
            a, b = j % 6, (j + 1 + j // 6) % 6
            pair_gold = [0.0, 0.0] if j == 5 else [0.1 * j, 0.35] if j % 2 else [0.35, 0.1 * j]
            f.write(json.dumps({"prompt": TRAIN_PROMPTS[j % 2], "path1": f"images/{a}.png",
                                "path2": f"images/{b}.png", "gold": pair_gold}) + "\n")
    run_main(train_reward.main, train_reward.Config,
             ["--eval_only", "--drm=data/drm.safetensors", f"--prefs={folder}",
              f"--out_dir={tmp_path / 'eval'}", "--eval_noise_draws=1"])
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert len(saved["per_pair"]["prompt"]) == 12 and len(set(saved["per_pair"]["prompt"])) == 2
    for label, text in saved["per_pair"]["gold"].items():
        assert len(text) == 12 and text[5] == "-" and text.count("-") == 1
        ordered = [int(c) for c in text if c != "-"]
        # the same count in float32 and in Python's double: rounding ~1e-7; one pair's outcome
        # wrong moves the mean by 1/11
        assert sum(ordered) / len(ordered) == pytest.approx(
            saved["accuracy"][label]["gold_accuracy"], abs=1e-6)
    # a DRM whose finite weights overflow to inf scores is refused, and nothing is written
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open("data/drm.safetensors", "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["drm.head.mlp.3.weight"] = torch.full(tensors["drm.head.mlp.3.weight"].shape, 3e38)
    save_file(tensors, str(tmp_path / "overflow.safetensors"), metadata)
    with pytest.raises(SystemExit, match="scores NaN or inf at sigma 0, 0.25"):
        run_main(train_reward.main, train_reward.Config,
                 ["--eval_only", f"--drm={tmp_path / 'overflow.safetensors'}", f"--prefs={folder}",
                  f"--out_dir={tmp_path / 'overflow'}", "--eval_noise_draws=1"])
    assert not (tmp_path / "overflow" / "eval.json").exists()

