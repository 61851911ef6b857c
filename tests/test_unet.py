"""Unit tests for models/unet.py: shapes, gradients, caption masking, time conditioning,
config round-trip and the errors users see. Tiny configs on CPU, a few seconds in all."""

from __future__ import annotations

import json

import pytest
import torch

from models.unet import UNet, UNetConfig

CTX_DIM = 16
TINY = UNetConfig(channels=(16, 32), attention_levels=(False, True), head_dim=8, norm_groups=8,
                  context_dim=CTX_DIM)
# the smallest UNet that still has every kind of block: for the slower tests
SMALLEST = UNetConfig(channels=(8, 16), attention_levels=(False, True), layers_per_block=1, head_dim=8,
                      norm_groups=4, context_dim=CTX_DIM)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tiny tensors: threads cost more than they save


def randomized(cfg: UNetConfig, seed: int = 0) -> UNet:
    """A UNet whose zero-initialised layers got random weights, so every path reaches the output
    (a fresh UNet outputs exactly zero, which would make behaviour tests vacuous)."""
    torch.manual_seed(seed)
    model = UNet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return model.eval()


def inputs(cfg: UNetConfig, B: int = 2, H: int = 8, W: int = 8, L: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    context = torch.randn(B, L, cfg.context_dim, generator=g)
    return x, t, context


@pytest.mark.parametrize(
    "cfg, hw",
    [
        (TINY, (8, 8)),
        # three levels, attention on the outer levels only, two transformer layers, non-square input
        (UNetConfig(channels=(16, 16, 32), attention_levels=(True, False, False), head_dim=8, norm_groups=8,
                    transformer_depth=2, layers_per_block=1, context_dim=CTX_DIM), (16, 24)),
        # other in/out channels (e.g. a latent space, or predicting eps and a variance)
        (UNetConfig(in_channels=4, out_channels=6, channels=(8, 16), attention_levels=(True, True), head_dim=4,
                    norm_groups=4, context_dim=CTX_DIM, time_embed_dim=24, dropout=0.1), (12, 8)),
        # one level: no resampling, any size goes
        (UNetConfig(channels=(16,), attention_levels=(False,), head_dim=16, norm_groups=8, context_dim=CTX_DIM),
         (7, 5)),
    ],
)
def test_output_has_input_shape(cfg, hw):
    x, t, context = inputs(cfg, H=hw[0], W=hw[1])
    out = UNet(cfg)(x, t, context)
    assert out.shape == (x.shape[0], cfg.out_channels, *hw)


def test_fresh_unet_predicts_zero():
    # zero-initialised conv_out: the untrained model starts at the mean of eps
    x, t, context = inputs(TINY)
    assert torch.equal(UNet(TINY)(x, t, context), torch.zeros_like(x))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = UNet(SMALLEST).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t, context = inputs(SMALLEST, B=4)
    mask = torch.ones(4, context.shape[1], dtype=torch.bool)
    mask[1, 3:] = False
    reached = {name: False for name, _ in model.named_parameters()}
    # zero-initialised layers pass gradient on only once they have moved: a few steps
    for _ in range(3):
        opt.zero_grad()
        loss = (model(x, t, context, mask) - torch.randn_like(x)).pow(2).mean()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name} got no gradient"
            reached[name] |= bool(p.grad.abs().sum() > 0)
        opt.step()
    assert all(reached.values()), [n for n, r in reached.items() if not r]


def test_padded_caption_tokens_do_not_change_the_output():
    model = randomized(TINY)
    x, t, context = inputs(TINY, L=6)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    with torch.no_grad():
        out = model(x, t, context, mask)

        padded = context.clone()
        padded[~mask] = torch.randn(int((~mask).sum()), CTX_DIM) * 100
        torch.testing.assert_close(model(x, t, padded, mask), out, atol=1e-6, rtol=0)

        real = context.clone()
        real[1, 0] += 1.0
        changed = model(x, t, real, mask)
        torch.testing.assert_close(changed[0], out[0], atol=1e-6, rtol=0)  # rows are independent
        assert (changed[1] - out[1]).abs().max() > 1e-4


def test_no_mask_means_every_token_counts():
    model = randomized(TINY)
    x, t, context = inputs(TINY, L=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, context), model(x, t, context, torch.ones(2, 4, dtype=torch.bool)))
        other = context.clone()
        other[:, -1] += 1.0
        assert (model(x, t, other) - model(x, t, context)).abs().max() > 1e-4


def test_all_masked_caption_attends_to_nothing():
    # Documented behaviour: a row with no valid token gets zero cross-attention output,
    # so it is finite and independent of the (masked) token values.
    model = randomized(TINY)
    x, t, context = inputs(TINY, L=4)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    with torch.no_grad():
        out = model(x, t, context, mask)
        assert torch.isfinite(out).all()
        other = context.clone()
        other[1] = torch.randn(4, CTX_DIM)
        torch.testing.assert_close(model(x, t, other, mask), out, atol=1e-6, rtol=0)


def test_timestep_conditions_the_output():
    model = randomized(TINY)
    x, _, context = inputs(TINY)
    with torch.no_grad():
        early = model(x, torch.tensor([10, 10]), context)
        late = model(x, torch.tensor([900, 900]), context)
        assert (early - late).abs().max() > 1e-3
        # int and float timesteps agree; a 0-d timestep applies to the whole batch
        torch.testing.assert_close(model(x, torch.tensor([10.0, 10.0]), context), early)
        torch.testing.assert_close(model(x, torch.tensor(10), context), early)


def test_channels_last_input_gives_the_same_output_in_the_same_layout():
    model = randomized(TINY)
    x, t, context = inputs(TINY)
    with torch.no_grad():
        ref = model(x, t, context)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, context)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_runs():
    model = randomized(TINY)
    x, t, context = inputs(TINY)
    mask = torch.tensor([[True] * 5, [True, False, False, False, False]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), model(x, t, context, mask), atol=0.1, rtol=0.1)


def test_traces_as_one_graph():
    # fullgraph=True fails on any graph break: no host syncs or data-dependent Python branches.
    model = randomized(SMALLEST)
    x, t, context = inputs(SMALLEST)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, context, mask), model(x, t, context, mask))


def test_config_round_trip_rebuilds_the_same_model():
    cfg = UNetConfig(channels=(8, 16, 16), attention_levels=(False, True, False), head_dim=4, norm_groups=4,
                     context_dim=CTX_DIM, transformer_depth=2, time_embed_dim=40)
    d = json.loads(json.dumps(cfg.to_dict()))  # as it is stored beside the weights
    assert UNetConfig.from_dict(d) == cfg
    assert UNetConfig.from_dict({"channels": [8, 16], "attention_levels": [False, True], "head_dim": 8,
                                 "norm_groups": 8}).channels == (8, 16)

    model = randomized(cfg)
    rebuilt = UNet(UNetConfig.from_dict(d)).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes
    x, t, context = inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, context), model(x, t, context), atol=0, rtol=0)


def test_defaults_and_downsample_factor():
    cfg = UNetConfig()
    assert cfg.downsample_factor == 4 and cfg.time_dim == 256
    assert UNetConfig(channels=(32,), attention_levels=(True,)).downsample_factor == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"attention_levels": (False, True)}, ValueError, "one True/False per level"),
        ({"channels": (64, 100, 256)}, ValueError, r"\[100\] are not divisible by norm_groups=32"),
        ({"head_dim": 48}, ValueError, "not divisible by head_dim=48"),
        ({"channels": ()}, ValueError, "channels is empty"),
        ({"layers_per_block": 0}, ValueError, "layers_per_block must be a positive int"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"attention_levels": (0, 1, 1)}, TypeError, "True/False"),
        ({"channels": 64}, TypeError, "must be a tuple"),
    ],
)
def test_bad_config_is_rejected_with_a_reason(kwargs, error, match):
    with pytest.raises(error, match=match):
        UNetConfig(**kwargs)


def test_unknown_config_keys_are_named():
    with pytest.raises(ValueError, match=r"\['chanels', 'heads'\]"):
        UNetConfig.from_dict({"chanels": [32], "heads": 4})


def test_bad_inputs_are_rejected_with_a_reason():
    model = UNet(TINY)
    x, t, context = inputs(TINY)
    with pytest.raises(ValueError, match=r"Input size 9x8 is not divisible by 2.*10x8"):
        model(torch.randn(2, 3, 9, 8), t, context)
    with pytest.raises(ValueError, match="context_dim must equal the text encoder's width"):
        model(x, t, torch.randn(2, 5, CTX_DIM + 1))
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        model(torch.randn(2, 1, 8, 8), t, context)
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.zeros(3), context)
    with pytest.raises(TypeError, match="bool"):
        model(x, t, context, torch.ones(2, 5))
    with pytest.raises(ValueError, match="context_mask must be"):
        model(x, t, context, torch.ones(2, 4, dtype=torch.bool))


# ---- global text conditioning: the pooled caption embedding -------------------------------

POOLED_DIM = 12
POOLED = UNetConfig(channels=(8, 16), attention_levels=(False, True), layers_per_block=1, head_dim=8,
                    norm_groups=4, context_dim=CTX_DIM, pooled_dim=POOLED_DIM)


def pooled_inputs(B: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randn(B, POOLED_DIM, generator=torch.Generator().manual_seed(seed))


def test_pooled_dim_none_is_the_plain_model():
    # backward compatible: same parameter names as before, no pooled MLP
    keys = set(UNet(SMALLEST).state_dict())
    assert not any(k.startswith("pooled_embed") for k in keys)
    with_pooled = set(UNet(UNetConfig(**{**SMALLEST.to_dict(), "pooled_dim": POOLED_DIM})).state_dict())
    assert with_pooled - keys == {f"pooled_embed.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}


def test_output_depends_on_the_pooled_embedding():
    model = randomized(POOLED)
    x, t, context = inputs(POOLED)
    pooled = pooled_inputs()
    with torch.no_grad():
        a = model(x, t, context, pooled=pooled)
        b = model(x, t, context, pooled=pooled_inputs(seed=3))
        assert (a - b).abs().max() > 1e-3
        # sample i depends on pooled[i] only
        torch.testing.assert_close(model(x[:1], t[:1], context[:1], pooled=pooled[:1]), a[:1], atol=1e-5, rtol=1e-4)


def test_gradients_reach_the_pooled_projection():
    torch.manual_seed(0)
    model = UNet(POOLED).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t, context = inputs(POOLED, B=4)
    pooled = pooled_inputs(B=4)
    reached = {name: False for name, _ in model.named_parameters()}
    for _ in range(3):  # zero-initialised layers pass gradient on only once they have moved
        opt.zero_grad()
        (model(x, t, context, pooled=pooled) - torch.randn_like(x)).pow(2).mean().backward()
        for name, p in model.named_parameters():
            reached[name] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        opt.step()
    assert all(reached.values()), [n for n, r in reached.items() if not r]
    assert any(n.startswith("pooled_embed") for n in reached)


def test_pooled_input_errors_teach():
    model = UNet(POOLED)
    x, t, context = inputs(POOLED)
    with pytest.raises(ValueError, match=r"conditioned on the pooled caption embedding .*pooled_dim=12.*pass pooled"):
        model(x, t, context)
    with pytest.raises(ValueError, match=r"pooled must be \(B, E\) = \(2, 12\)"):
        model(x, t, context, pooled=torch.randn(2, 13))
    with pytest.raises(ValueError, match="pooled_dim is None"):
        UNet(SMALLEST)(x, t, context, pooled=torch.randn(2, 12))
    with pytest.raises(ValueError, match="pooled_dim must be a positive int"):
        UNetConfig(pooled_dim=0)
