"""model.py against independent references: hand-computed formulas, public parameter counts, eager
code."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs, relative, within

from data.world import TextConfig, TextEncoder
from lora import add_lora, export_state_dict
from model import DiTConfig, build_dit, compile_regions, flow_matching_loss, timestep_embedding
from sde import sample_ode

SMALL = DiTConfig(in_channels=1, out_channels=1, patch_size=4, dim=64, depth=3, heads=2,
                  context_dim=16,
                  pooled_dim=16, pos_embed_max_size=8, qk_norm=True, dual_attention_layers=(0,))


def small_inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 1, 32, 32, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, 5, 16, generator=g), torch.randn(batch, 16, generator=g))


def randomized(model, seed=0):
    """Give every parameter random values, so zero-initialised gates do not hide wiring mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("preset, billions, exact", [("sd3-medium", 2.09, 2_084_951_104),
                                                     ("sd3.5-medium", 2.47, 2_469_663_936),
                                                     ("sd3.5-large", 8.15, 8_146_280_768)])
def test_public_parameter_counts(preset, billions, exact):
    """The public checkpoints' tensor counts (pos_embed included: it is a stored tensor there too).

    `exact` is what diffusers 0.42's SD3Transformer2DModel gives on the meta device for the
    public configs; `billions` is the figure quoted for the models (2.085 is quoted as 2.09).
    """
    dit = build_dit(preset, device="meta")
    count = sum(t.numel() for t in dit.state_dict().values())
    assert count == exact
    assert abs(count / 1e9 - billions) < 0.01


@pytest.mark.ex1_flow_matching
def test_flow_matching_target_on_hand_made_tensors():
    x0 = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    noise = torch.tensor([[[[0.0, 2.0], [-1.0, 1.0]]]])
    sigma = torch.tensor([0.25])
    seen = {}

    def zero_model(x, s, context, pooled):
        seen["x"] = x.clone()
        return torch.zeros_like(x)
    losses, _ = flow_matching_loss(zero_model, x0, None, None, sigma=sigma, noise=noise)
    # x_sigma = 0.75 x0 + 0.25 noise; target noise - x0 = [-1, 3, -1.5, 1] -> mean square 13.25 / 4
    within(max_abs(seen["x"], torch.tensor([[[[0.75, -0.25], [0.125, 0.25]]]])), 1e-7, "x_sigma")
    within(abs(losses.item() - (1 + 9 + 2.25 + 1) / 4), 1e-6, "loss")
    oracle = flow_matching_loss(lambda x, s, c, p: noise - x0, x0, None, None, sigma=sigma,
                                noise=noise)[0]
    assert oracle.item() == 0


@pytest.mark.ex1_flow_matching
def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    dit, text = build_dit(SMALL), TextEncoder(TextConfig(context_dim=16, pooled_dim=16))
    x0 = torch.randn(8, 1, 32, 32)
    noise, sigma, ids = torch.randn_like(x0), torch.rand(8), torch.randint(1, 21, (8, 8))
    params = list(dit.parameters()) + list(text.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def loss():
        return flow_matching_loss(dit, x0, *text(ids), sigma=sigma, noise=noise)[0].mean()
    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss() < before


@pytest.mark.ex1_flow_matching
def test_sampler_with_one_step_is_one_euler_step():
    dit = randomized(build_dit(SMALL)).eval()
    x, _, context, pooled = small_inputs()
    out = sample_ode(dit, x, (context, pooled), steps=1)
    velocity = dit(x, torch.ones(3), context, pooled)
    within(max_abs(out, x - velocity), 1e-6, "x after one step")


@pytest.mark.ex1_flow_matching
def test_guidance_combines_conditional_and_unconditional_velocities():
    """Rounding seen 3.6e-6 (8 arithmetic variants: the guided pass batches both prompts),
    tolerance 1e-4; a bug, guidance's weight off by one: 0.45 (tests/mutations.py)."""
    dit = randomized(build_dit(SMALL)).eval()
    x, _, context, pooled = small_inputs()
    uncond = (torch.zeros_like(context), torch.zeros_like(pooled))
    out = sample_ode(dit, x, (context, pooled), uncond, steps=1, cfg_scale=3.0)
    with torch.no_grad():
        v_c, v_u = dit(x, torch.ones(3), context, pooled), dit(x, torch.ones(3), *uncond)
    within(max_abs(out, x - (v_u + 3.0 * (v_c - v_u))), 1e-4, "x after one guided step")


def test_timestep_embedding_is_cos_then_sin():
    """float32's cos and sin of arguments up to 500: rounding seen 3.7e-6, tolerance 1e-4; sin
    first: 1.2 (tests/mutations.py)."""
    t = torch.tensor([0.0, 500.0])
    emb = timestep_embedding(t, dim=8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    within(max_abs(emb, expected), 1e-4, "embedding")


def test_joint_attention_matches_a_naive_two_stream_reference():
    """One joint block, recomputed by hand with explicit softmax attention over [context; image]
    tokens."""
    dit = randomized(build_dit(SMALL))
    block = dit.joint_blocks[1]  # a plain block: no dual attention, context not pre-only
    g = torch.Generator().manual_seed(1)
    context, x, c = torch.randn(2, 5, 64, generator=g), torch.randn(2, 7, 64,
        generator=g), torch.randn(2, 64, generator=g)

    def stream(sb, h):
        shift1, scale1, gate1, shift2, scale2, gate2 = sb.adaLN_modulation(c).chunk(6, dim=1)
        normed = F.layer_norm(h, (64,), eps=1e-6) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = (normed @ sb.attn.qkv.weight.T + sb.attn.qkv.bias).view(2, -1, 3, 2, 32).unbind(2)
        rms = lambda t, w: t / torch.sqrt((t ** 2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
        return rms(q, sb.attn.ln_q.weight), rms(k, sb.attn.ln_k.weight), v, (shift2, scale2, gate1,
                                                                             gate2)

    qc, kc, vc, mod_c = stream(block.context_block, context)
    qx, kx, vx, mod_x = stream(block.x_block, x)
    q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((qc, qx), (kc, kx), (vc, vx)))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1) @ v   # (B, heads, L, hd)
    attn = attn.transpose(1, 2).reshape(2, 12, 64)

    def finish(sb, h, a, mod):
        shift2, scale2, gate1, gate2 = mod
        h = h + gate1[:, None] * sb.attn.proj(a)
        m = F.layer_norm(h, (64,), eps=1e-6) * (1 + scale2[:, None]) + shift2[:, None]
        return h + gate2[:, None] * sb.mlp.fc2(F.gelu(sb.mlp.fc1(m), approximate="tanh"))
    expected_context = finish(block.context_block, context, attn[:, :5], mod_c)
    expected_x = finish(block.x_block, x, attn[:, 5:], mod_x)
    out_context, out_x = block(context, x, c)
    within(max_abs(out_context, expected_context), 1e-5, "context stream")
    within(max_abs(out_x, expected_x), 1e-5, "image stream")


def test_block_structure_pre_only_and_dual_attention():
    dit = build_dit(SMALL, device="meta")
    last = dit.joint_blocks[-1].context_block
    assert last.pre_only and last.attn.proj is None and not hasattr(last, "mlp")
    assert last.adaLN_modulation[1].out_features == 2 * 64           # (shift, scale) only
    assert dit.joint_blocks[0].x_block.adaLN_modulation[1].out_features == 9 * 64  # dual attention
    assert dit.joint_blocks[1].x_block.attn2 is None


def test_context_tokens_are_an_unordered_set():
    """No position embedding on the text stream: permuting context tokens must not change the
    velocity beyond the rounding of another summation order (seen 1.1e-6; tolerance 1e-4); a
    position embedding on the text would move it by O(1)."""
    dit = randomized(build_dit(SMALL)).eval()
    x, sigma, context, pooled = small_inputs()
    perm = torch.randperm(context.shape[1])
    with torch.no_grad():
        within(max_abs(dit(x, sigma, context, pooled), dit(x, sigma, context[:, perm], pooled)),
               1e-4, "velocity, permuted context")


def test_early_exit_returns_the_hidden_tokens_the_full_forward_uses():
    dit = randomized(build_dit(SMALL)).eval()
    x, sigma, context, pooled = small_inputs()
    with torch.no_grad():
        tokens, c = dit.features(x, sigma, context, pooled)
        assert tokens.shape == (3, 64, 64) and c.shape == (3, 64)
        velocity = dit.unpatchify(dit.final_layer(tokens, c), 32, 32)
        within(max_abs(velocity, dit(x, sigma, context, pooled)), 1e-6, "velocity")


def test_pos_embed_is_the_centre_crop_of_the_stored_grid():
    dit = build_dit(DiTConfig(**{**SMALL.__dict__, "pos_embed_max_size": 6, "patch_size": 8}))
    grid = torch.arange(36 * 64, dtype=torch.float32).view(1, 36, 64)
    dit.pos_embed.copy_(grid)
    # rows 2-3, columns 1-4 of the 6x6 grid
    crop = dit.cropped_pos_embed(2, 4)
    rows = [r * 6 + c for r in (2, 3) for c in (1, 2, 3, 4)]
    assert torch.equal(crop[0], grid[0, rows])


def velocity_and_grads(dit, inputs):
    dit.zero_grad()
    velocity = dit(*inputs)
    velocity.square().mean().backward()
    return velocity.detach(), {n: p.grad.clone() for n, p in dit.named_parameters()}


def test_compiled_dit_agrees_with_eager_in_forward_and_gradients(compiled):
    """Every region (plain block, dual-attention block, pre-only last block, final layer) compiled
    vs eager."""
    dit, inputs = randomized(build_dit(SMALL)), small_inputs()
    eager_velocity, eager_grads = velocity_and_grads(dit, inputs)
    velocity, grads = velocity_and_grads(compile_regions(dit), inputs)
    within(relative(velocity, eager_velocity), 1e-4, "velocity, relative")
    within(max(relative(grad, eager_grads[name]) for name, grad in grads.items()
               if eager_grads[name].norm() > 0), 1e-3, "worst gradient, relative")
    # the compiled path really ran
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


@pytest.mark.ex1_flow_matching
def test_compiled_training_loop_compiles_once(compiled):
    """After the first step, further steps of the same shapes add no graphs and trigger no
    recompiles."""
    dit = compile_regions(build_dit(SMALL))
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-3)
    x0, _, context, pooled = small_inputs()  # the shapes of the test above: its graphs cached

    def train_step():
        loss = flow_matching_loss(dit, x0, context, pooled)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # and a short sampling loop, sigma changing every step
            sample_ode(dit, torch.randn_like(x0), (context, pooled), None, steps=3)
    train_step()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    for _ in range(3):
        train_step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames
    assert not torch._dynamo.utils.counters["recompiles"]


def test_gradient_checkpointing_gives_the_same_gradients():
    dit, inputs = randomized(build_dit(SMALL)), small_inputs()
    velocity, grads = velocity_and_grads(dit, inputs)
    dit.grad_checkpointing = True
    recomputed = []
    hooks = [block.register_forward_pre_hook(lambda *_: recomputed.append(1))
             for block in dit.joint_blocks]
    velocity_ckpt, grads_ckpt = velocity_and_grads(dit, inputs)
    # each block ran again in the backward: checkpointing is on
    assert len(recomputed) == 2 * SMALL.depth
    assert torch.equal(velocity, velocity_ckpt)
    within(max(relative(grads_ckpt[name], grad) for name, grad in grads.items()
               if grad.norm() > 0), 1e-5, "worst gradient, relative")
    for hook in hooks:
        hook.remove()


def test_lora_starts_as_identity_and_trains_only_lora_weights():
    """Zero-initialised B: the same velocity up to rounding (seen 9.5e-7 under MKL_CBWR=COMPATIBLE;
    tolerance 1e-5); folded into a plain DiT, the trained LoRA's (tolerance 1e-5); a LoRA whose
    forward and fold disagree by 10% of its scaling: 18x the tolerance (tests/mutations.py)."""
    dit = randomized(build_dit(SMALL))
    x, sigma, context, pooled = small_inputs()
    with torch.no_grad():
        before = dit(x, sigma, context, pooled)
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    loras = add_lora(dit, rank=4, alpha=4.0)
    # qkv + proj per stream and block, none on the pre-only stream's proj, attn2 in block 0
    assert len(loras) == 3 * 2 * 2 - 1 + 2
    trainable = {n for n, p in dit.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        within(max_abs(dit(x, sigma, context, pooled), before), 1e-5, "velocity with LoRA")
    optimizer = torch.optim.SGD([p for p in dit.parameters() if p.requires_grad], lr=0.1)
    dit(x, sigma, context, pooled).pow(2).mean().backward()
    optimizer.step()
    state = dit.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())          # base weights untouched
    with torch.no_grad():
        trained = dit(x, sigma, context, pooled)
        assert not torch.allclose(trained, before, atol=1e-4)
        # the LoRA folded into the weights of a plain DiT: the same model
        plain = build_dit(SMALL).eval()
        plain.load_state_dict(export_state_dict(dit))
        within(max_abs(plain(x, sigma, context, pooled), trained), 1e-5, "velocity folded")
        assert torch.equal(dit.state_dict()["joint_blocks.0.x_block.attn.qkv.weight"],
                           # the LoRA'd model untouched
                           base["joint_blocks.0.x_block.attn.qkv.weight"])


def test_text_encoder_ignores_padding():
    text = TextEncoder(TextConfig()).eval()
    ids = torch.tensor([[1, 2, 7, 0, 0, 0, 0, 0]])
    other_pad_embedding = ids.clone()
    with torch.no_grad():
        context, pooled = text(ids)
        text.token_embedding.weight[0].add_(5.0)  # padding tokens now look different
        context2, pooled2 = text(other_pad_embedding)
    within(max_abs(pooled, pooled2), 1e-5, "pooled")
    within(max_abs(context[:, :3], context2[:, :3]), 1e-5, "context")


def test_unpatchify_reads_tokens_in_sd3_patch_order():
    """Token (i, j) holds pixels [i*p:(i+1)*p, j*p:(j+1)*p] flattened as (row, column, channel)."""
    dit = build_dit(SMALL)
    B, C, H, W, p = 2, 1, 16, 12, SMALL.patch_size
    image = torch.randn(B, C, H, W)
    tokens = torch.stack([torch.stack([image[b, :, i * p:(i + 1) * p,
                                             j * p:(j + 1) * p].permute(1, 2, 0).flatten()
                                       for i in range(H // p) for j in range(W // p)])
                                       for b in range(B)])
    assert torch.equal(dit.unpatchify(tokens, H, W), image)
