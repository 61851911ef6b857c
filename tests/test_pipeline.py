import pickle
from pathlib import Path

import pytest
import torch

from models.checkpoint import UnsafeCheckpointError
from models.pipeline import GenerationParams, TextToImage
from models.schedule import NoiseSchedule, ScheduleConfig
from models.text_encoder import TextEncoder, TextEncoderConfig
from models.unet import UNet, UNetConfig


def tiny_pipe(tiny_clip: str, seed: int, pooled: bool = False, extra: dict | None = None) -> TextToImage:
    """A toy TextToImage; with `pooled`, its UNet also takes the pooled caption embedding."""
    torch.manual_seed(seed)
    encoder = TextEncoder(TextEncoderConfig(model_name=tiny_clip, allow_random_init=True, random_init_seed=3))
    unet = UNet(
        UNetConfig(channels=(16, 32), attention_levels=(False, True), layers_per_block=1, head_dim=8,
                   norm_groups=8, context_dim=encoder.width, pooled_dim=encoder.pooled_dim if pooled else None)
    )
    # conv_out is zero-initialised; perturb every weight so outputs depend on the prompt
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    schedule = NoiseSchedule(ScheduleConfig(num_train_timesteps=100))
    return TextToImage(unet, schedule, encoder, resolution=8, extra=extra)


@pytest.fixture
def pipe(tiny_clip) -> TextToImage:
    return tiny_pipe(tiny_clip, seed=0, extra={"step": 0})


def test_same_seed_same_image_and_prompts_matter(pipe):
    params = GenerationParams(steps=5)
    a = pipe.generate(["a red circle", "a blue square"], seeds=7, params=params)
    b = pipe.generate(["a red circle", "a blue square"], seeds=7, params=params)
    assert a.shape == (2, 3, 8, 8)
    assert torch.equal(a, b)
    c = pipe.generate(["a red circle"], seeds=8, params=params)
    assert not torch.equal(a[:1], c)
    # an image depends on its own prompt and seed only, not on the rest of the batch
    alone = pipe.generate(["a blue square"], seeds=[8], params=params)
    assert torch.allclose(a[1:], alone, atol=1e-5)


def test_stored_empty_caption_is_checked_on_its_real_tokens(pipe):
    from mlflow.exceptions import MlflowException

    from models.mlflow_model import _check_uncond

    uncond = pipe.text_encoder.encode([""])
    tokens, mask = uncond.tokens[0].clone(), uncond.mask[0]  # (L, D), (L,)
    assert not tokens[~mask].any()
    tokens[~mask] = torch.randn_like(tokens[~mask])  # as registered before padding states were zeroed
    _check_uncond(pipe, {"tokens": tokens, "mask": mask})
    tokens[1] += 1.0  # a real token differs by O(1): another encoder
    with pytest.raises(MlflowException, match="does not reproduce the stored empty-caption embedding"):
        _check_uncond(pipe, {"tokens": tokens, "mask": mask})


def test_save_then_load_reproduces_outputs(pipe, tmp_path):
    pipe.save(tmp_path / "model")
    loaded = TextToImage.load(tmp_path / "model")
    for sampler in ["ddim", "dpmpp_2m"]:
        params = GenerationParams(steps=4, sampler=sampler, guidance_scale=2.0)
        assert torch.equal(
            pipe.generate(["a green triangle"], seeds=1, params=params),
            loaded.generate(["a green triangle"], seeds=1, params=params),
        )
    images = loaded(["a green triangle"], seed=1, steps=3)
    assert images[0].size == (8, 8) and images[0].mode == "RGB"


def test_saved_unet_weights_override(pipe, tmp_path):
    ema = {k: torch.zeros_like(v) for k, v in pipe.unet.state_dict().items()}
    pipe.save(tmp_path / "model", unet_state=ema)
    loaded = TextToImage.load(tmp_path / "model")
    assert all(torch.count_nonzero(v) == 0 for v in loaded.unet.state_dict().values())


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_a_pickle_that_carries_code_is_refused(pipe, tmp_path):
    pipe.save(tmp_path / "model")
    marker = tmp_path / "pwned"
    (tmp_path / "model" / "unet.safetensors").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    with pytest.raises(UnsafeCheckpointError):
        TextToImage.load(tmp_path / "model")
    assert not marker.exists()


def test_trained_encoder_weights_travel_with_the_model(tiny_clip, pipe, tmp_path):
    weights = tmp_path / "clip.safetensors"
    from models.checkpoint import save_weights

    save_weights(pipe.text_encoder.clip.state_dict(), weights)
    encoder = TextEncoder(TextEncoderConfig(model_name=tiny_clip, weights=str(weights)))
    with_file = TextToImage(pipe.unet, pipe.schedule, encoder, resolution=8)
    with_file.save(tmp_path / "model")
    weights.unlink()  # the saved model must not depend on the original file
    loaded = TextToImage.load(tmp_path / "model")
    params = GenerationParams(steps=3)
    assert torch.equal(with_file.generate(["x"], 0, params), loaded.generate(["x"], 0, params))


def test_a_pretrained_tags_image_preprocessing_travels_with_the_model(tiny_clip, pipe, tmp_path):
    weights = tmp_path / "clip.safetensors"
    from models.checkpoint import save_weights

    save_weights(pipe.text_encoder.clip.state_dict(), weights)
    encoder = TextEncoder(TextEncoderConfig(model_name=tiny_clip, weights=str(weights)))
    encoder.use_image_preprocess({"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})  # what such a tag sets
    TextToImage(pipe.unet, pipe.schedule, encoder, resolution=8).save(tmp_path / "model")
    loaded = TextToImage.load(tmp_path / "model").text_encoder  # from the copied weights file, not the tag
    assert tuple(loaded.image_preprocess["mean"]) == (0.5, 0.5, 0.5) and tuple(loaded.image_preprocess["std"]) == (0.5, 0.5, 0.5)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.encode_images(images), encoder.encode_images(images))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "euler"}, "unknown sampler"),
        ({"steps": 0}, "steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"precision": "fp16"}, "precision"),
        ({"sampler": "dpmpp_2m", "eta": 0.5}, "eta applies to the ddim sampler only"),
        ({"sampler": "ddpm", "eta": 1.0}, "eta applies to the ddim sampler only"),
    ],
)
def test_bad_generation_params_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationParams(**kwargs)


def test_load_of_a_non_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        TextToImage.load(tmp_path)


@pytest.fixture
def pooled_pipe(tiny_clip) -> TextToImage:
    """A pipeline whose UNet also takes the pooled caption embedding (global text conditioning)."""
    return tiny_pipe(tiny_clip, seed=1, pooled=True)


def test_pooled_unet_uses_the_pooled_embedding_and_round_trips(pooled_pipe, tmp_path):
    params = GenerationParams(steps=4, guidance_scale=3.0)
    a = pooled_pipe.generate(["a red circle"], seeds=1, params=params)
    # the pooled path is live: silencing its MLP changes the image
    with torch.no_grad():
        saved = pooled_pipe.unet.pooled_embed[2].weight.clone()
        pooled_pipe.unet.pooled_embed[2].weight.zero_()
        pooled_pipe.unet.pooled_embed[2].bias.zero_()
        silenced = pooled_pipe.generate(["a red circle"], seeds=1, params=params)
        pooled_pipe.unet.pooled_embed[2].weight.copy_(saved)
    assert not torch.allclose(a, silenced, atol=1e-4)

    pooled_pipe.unet.pooled_embed[2].bias.data.normal_(0, 0.05)
    pooled_pipe.save(tmp_path / "model")
    loaded = TextToImage.load(tmp_path / "model")
    assert loaded.unet.config.pooled_dim == pooled_pipe.text_encoder.pooled_dim
    for scale in (1.0, 3.0):
        params = GenerationParams(steps=4, guidance_scale=scale)
        assert torch.equal(
            pooled_pipe.generate(["a green triangle", "x"], seeds=2, params=params),
            loaded.generate(["a green triangle", "x"], seeds=2, params=params),
        )


def test_pooled_width_mismatch_is_a_clear_error(pooled_pipe):
    cfg = UNetConfig(**{**pooled_pipe.unet.config.to_dict(), "pooled_dim": pooled_pipe.text_encoder.pooled_dim + 1})
    with pytest.raises(ValueError, match="pooled width"):
        TextToImage(UNet(cfg), pooled_pipe.schedule, pooled_pipe.text_encoder, resolution=8)


def test_bf16_sampling_stays_close_to_fp32_and_returns_float32(pooled_pipe):
    fp32 = pooled_pipe.generate(["a red circle", "a blue square"], seeds=[3, 4], params=GenerationParams(steps=4))
    bf16 = pooled_pipe.generate(
        ["a red circle", "a blue square"], seeds=[3, 4], params=GenerationParams(steps=4, precision="bf16")
    )
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    diff = (bf16 - fp32).abs()
    assert 0 < diff.max() < 0.1 and diff.mean() < 0.01  # bf16 rounding, not another image


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_step_noise_is_not_the_starting_noise(pipe, monkeypatch, sampler, eta):
    """A stochastic sampler's fresh noise must be independent of x_T: drawing it from a generator
    seeded like prompt 0's x_T would replay x_T[0] as the first step's noise."""
    import models.samplers.ddim as ddim
    import models.samplers.ddpm as ddpm

    module = ddpm if sampler == "ddpm" else ddim
    drawn, draw_noise = [], ddpm.draw_noise

    def recording_draw_noise(*args, **kwargs):
        drawn.append(draw_noise(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(module, "draw_noise", recording_draw_noise)
    params = GenerationParams(steps=3, sampler=sampler, eta=eta)
    a = pipe.generate(["a red circle", "a blue square"], seeds=[5, 6], params=params)
    x_T0 = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(5))
    assert drawn and not torch.equal(drawn[0][0], x_T0)
    assert torch.equal(a, pipe.generate(["a red circle", "a blue square"], seeds=[5, 6], params=params))


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_samplers_image_depends_on_its_own_seed_only(pipe, sampler, eta):
    """A served request (prompt, seed) gives one image whatever else shares its batch, also when the
    sampler adds noise on every step."""
    params = GenerationParams(steps=3, sampler=sampler, eta=eta)
    both = pipe.generate(["a red circle", "a blue square"], seeds=[7, 8], params=params)
    alone = pipe.generate(["a blue square"], seeds=[8], params=params)
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)
    other_seed = pipe.generate(["a blue square"], seeds=[9], params=params)
    assert (other_seed - alone).abs().max() > 1e-3


def test_seeds_must_be_integers_never_rounded(pipe):
    params = GenerationParams(steps=1)
    for bad in ([1.5], [True], ["3"], 2.0):
        with pytest.raises(ValueError, match="seeds must be integers"):
            pipe.generate(["a red circle"], seeds=bad, params=params)
    with pytest.raises(ValueError, match="got 2 seeds for 1 prompts"):
        pipe.generate(["a red circle"], seeds=[1, 2], params=params)
    import numpy as np

    assert torch.equal(pipe.generate(["x"], seeds=[np.int64(4)], params=params), pipe.generate(["x"], 4, params))
    # Any sequence of integers, and an integer scalar of numpy or torch, is taken as it is.
    two = pipe.generate(["x", "y"], [3, 4], params)
    for seeds in (range(3, 5), torch.tensor([3, 4]), np.array([3, 4]), torch.tensor(3), np.int32(3)):
        assert torch.equal(pipe.generate(["x", "y"], seeds, params), two), seeds
    with pytest.raises(ValueError, match="seeds must be integers"):
        pipe.generate(["x"], torch.tensor([1.5]), params)
