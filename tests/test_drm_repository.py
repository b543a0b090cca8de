"""The paper's own DRM as its repository (jjaxonx/DRM at 5c3c101) has it: its head and forward
written out from drm/model.py and drm/transformer.py on a tiny random diffusers
SD3Transformer2DModel, its checkpoint read by reward.read_drm and ours exported into it; its
timestep sampler (drm/train.py) and image preprocessing (drm/dataset.py) against ours."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import max_abs, within
from PIL import Image
from safetensors.torch import save_file

import train_reward
from reward import read_drm
from sd3.mmdit import official_drm_tensors

diffusers = pytest.importorskip("diffusers")


class ConvScalarHeadGroupNorm(nn.Module):
    """drm/model.py's head, as written there."""

    def __init__(self, in_channels, base_ch=256, num_groups=32):
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(in_channels, base_ch, kernel_size=3, stride=2,
                                             padding=1),
                                   nn.GroupNorm(num_groups, base_ch), nn.ReLU(inplace=False))
        self.down2 = nn.Sequential(nn.Conv2d(base_ch, base_ch * 2, kernel_size=3, stride=2,
                                             padding=1),
                                   nn.GroupNorm(num_groups, base_ch * 2), nn.ReLU(inplace=False))
        self.down3 = nn.Sequential(nn.Conv2d(base_ch * 2, base_ch * 2, kernel_size=3, stride=2,
                                             padding=1),
                                   nn.GroupNorm(num_groups, base_ch * 2), nn.ReLU(inplace=False))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.mlp = nn.Sequential(nn.Linear(base_ch * 2, 512), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(512, 1))

    def forward(self, x):
        return self.mlp(self.gap(self.down3(self.down2(self.down1(x)))).flatten(1))


class DRMRewardModel(nn.Module):
    """drm/model.py's DRMRewardModel: the whole transformer, the head; the forward of
    drm/transformer.py with layer_missing and inner_norm_proj: blocks 0 .. L - layer_missing - 1,
    norm_out(h, temb), proj_out, unpatchify."""

    def __init__(self, transformer, layer_missing):
        super().__init__()
        self.transformer, self.layer_missing = transformer, layer_missing
        self.reward_output = ConvScalarHeadGroupNorm(in_channels=transformer.out_channels)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        t = self.transformer
        height, width = hidden_states.shape[-2:]
        hidden_states = t.pos_embed(hidden_states)
        temb = t.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = t.context_embedder(encoder_hidden_states)
        for index_block, block in enumerate(t.transformer_blocks):
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb)
            if index_block == len(t.transformer_blocks) - self.layer_missing - 1:
                break
        hidden_states = t.proj_out(t.norm_out(hidden_states, temb))
        p = t.config.patch_size
        h, w = height // p, width // p
        hidden_states = hidden_states.reshape(hidden_states.shape[0], h, w, p, p, t.out_channels)
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        features = hidden_states.reshape(hidden_states.shape[0], t.out_channels, h * p, w * p)
        return self.reward_output(features)


def tiny_official_drm(depth, seed=0):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=16, pos_embed_max_size=8, qk_norm="rms_norm",
        dual_attention_layers=(0, 1) if depth == 24 else ())
    model = DRMRewardModel(transformer, {24: 3, 38: 5}[depth]).eval()
    with torch.no_grad():  # every weight random, so every piece shows in the score
        for name, p in model.named_parameters():
            p.normal_(0, 0.02 if "reward_output" not in name else 0.1)
    return model


def official_inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.tensor([0.9, 0.5, 0.0])[:batch]
    return (torch.randn(batch, 16, 8, 8, generator=g), torch.randn(batch, 5, 32, generator=g),
            torch.randn(batch, 16, generator=g), sigma)


@pytest.mark.ex2_drm
@pytest.mark.parametrize("depth", [24, 38])
def test_the_repositorys_checkpoint_reads_and_ours_exports_into_it(depth, tmp_path):
    official = tiny_official_drm(depth)
    x, context, pooled, sigma = official_inputs()
    with torch.no_grad():
        theirs = official(x, context, pooled, sigma * 1000).flatten()     # its timestep: 1000 sigma
    path = tmp_path / "model.safetensors"
    # drm/train.py's save
    save_file({k: v.contiguous() for k, v in official.state_dict().items()}, path)
    ours, meta, _ = read_drm(str(path))
    assert meta["drop_last"] == {24: 3, 38: 5}[depth] and meta["head"] == {24: "2BConvGN",
                                                                           38: "7BConvGN"}[depth]
    assert len(ours.backbone.joint_blocks) == depth - meta["drop_last"]
    with torch.no_grad():
        scores = ours(x, sigma, context, pooled)
    within(max_abs(scores, theirs) / theirs.abs().max().item(), 1e-4, "scores / largest score")
    # ours exported, the blocks it cut taken from the base transformer (as train_reward.py does),
    # loaded strictly
    from sd3.mmdit import load_sd3
    official.transformer.save_pretrained(tmp_path / "transformer")
    base = load_sd3(str(tmp_path / "transformer"))
    keep = depth - meta["drop_last"]
    skipped = {k: v for k, v in base.state_dict().items()
               if k.startswith("joint_blocks.") and int(k.split(".")[1]) >= keep}
    exported = official_drm_tensors(ours, skipped)
    assert set(exported) == set(official.state_dict())
    rebuilt = tiny_official_drm(depth, seed=7)
    rebuilt.load_state_dict(exported, strict=True)
    with torch.no_grad():
        again = rebuilt(x, context, pooled, sigma * 1000).flatten()
    within(max_abs(again, theirs) / theirs.abs().max().item(), 1e-4,
           "exported scores / largest score")


def test_a_cut_dit_checks_the_blocks_it_keeps_and_not_those_it_drops(tmp_path):
    """read_drm on the repository's file cuts the DiT after depth - drop_last blocks: a misshapen
    tensor in a kept block is refused, naming its key; one in a dropped block is never read, and
    the DRM loads with the same weights as from the intact file."""
    from checkpoints import CheckpointError
    state = {k: v.contiguous() for k, v in tiny_official_drm(24).state_dict().items()}
    save_file(state, tmp_path / "intact.safetensors")
    intact = read_drm(str(tmp_path / "intact.safetensors"))[0].state_dict()
    for block, loads in ((0, False), (22, True)):  # 24 blocks, the last 3 dropped
        key = f"transformer.transformer_blocks.{block}.ff.net.2.bias"
        broken = {**state, key: torch.zeros(state[key].shape[0] + 1)}
        path = tmp_path / f"block{block}.safetensors"
        save_file(broken, path)
        if loads:
            loaded = read_drm(str(path))[0].state_dict()
            assert loaded.keys() == intact.keys()
            assert all(torch.equal(loaded[k], intact[k]) for k in intact)
        else:
            with pytest.raises(CheckpointError, match=r"wrong shape 1 \(joint_blocks\.0\."):
                read_drm(str(path))


def test_the_timestep_sampler_is_the_repositorys():
    """drm/train.py: u = sigmoid(N(0, 1)) (diffusers' logit_normal density), indices = (u *
    1000).long(), timesteps = scheduler.timesteps[indices], sigma looked up in scheduler.sigmas; the
    same u, the same sigma, on SD3.5's shift-3 grid and the shift-1 one; and its evaluation's time t
    at scheduler.timesteps[-t]."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    u = torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(0)))
    u = torch.cat([u, torch.tensor([0.0, 0.9999, 0.5])])
    for shift in (3.0, 1.0):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        timesteps = scheduler.timesteps[(u * 1000).long()]
        lookup = torch.stack([(scheduler.timesteps == t).nonzero()[0, 0] for t in timesteps])
        # float32's rounding of a sigma near 1: 1.2e-7 (seen); one grid index off: 1e-3
        within(max_abs(train_reward.grid_sigma(u, shift), scheduler.sigmas[lookup].float()), 1e-5,
               f"sigma (shift {shift})")
        flags = train_reward.reward_ops.EvalFlags(eval_sigmas=(0.0,),
                                                  eval_times=(0, 250, 500, 750, 900))
        labels = train_reward.evaluation_sigmas(flags, shift)[1:]
        expected = [0.0] + [(scheduler.timesteps[-t] / 1000).item() for t in (250, 500, 750, 900)]
        within(max(abs(s - e) for (_, s), e in zip(labels, expected, strict=True)), 1e-6,
               f"evaluation sigma (shift {shift})")
    # the paper's 65.1%
    assert train_reward.evaluation_sigmas(flags, 3.0)[4][0] == "t=750 (sigma 0.900)"
    median = train_reward.training_sigma("grid", 20000, "cpu", shift=3.0).median()
    assert median == pytest.approx(0.75, abs=0.01)  # sampling, not rounding


def test_images_are_stretched_as_the_repositorys_loader(tmp_path):
    """drm/dataset.py: Image.open(p).convert("RGB").resize((size, size), BICUBIC), ToTensor,
    Normalize(0.5, 0.5)."""
    from sd3.pipeline import read_image
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 52, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    resized = Image.open(tmp_path / "wide.png").convert("RGB").resize((16, 16),
                                                                      resample=Image.BICUBIC)
    theirs = (torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0,
                                                                              1) / 255 - 0.5) / 0.5
    within(max_abs(read_image(str(tmp_path / "wide.png"), 16, "stretch"), theirs), 1e-6, "pixels")
    assert not torch.allclose(read_image(str(tmp_path / "wide.png"), 16, "crop"), theirs, atol=1e-2)
