import pytest
from pydantic import ValidationError

from tasks.presets import apply_override, available_presets, load_preset


def test_every_shipped_preset_validates():
    assert {"cpu-demo", "gpu-32px", "gpu-64px"} <= set(available_presets())
    for name in available_presets():
        preset = load_preset(name)
        assert preset.name == name
        # the data the preset ingests is the resolution it trains at
        assert preset.train.resolution in (None, preset.ingest.resolution)


def test_cpu_demo_never_needs_downloads():
    assert load_preset("cpu-demo").embed.encoder["allow_random_init"] is True


def test_overrides_parse_yaml_values():
    preset = load_preset("cpu-demo", ["train.steps=70", "train.unet={channels: [16, 32], attention_levels: [false, true], head_dim: 8, norm_groups: 8}", "register.model_name=m"])
    assert preset.train.steps == 70 and preset.train.unet["channels"] == [16, 32]
    assert preset.register.model_name == "m"


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(ValidationError, match="stepz"):
        load_preset("cpu-demo", ["train.stepz=7"])
    with pytest.raises(ValidationError, match="colour"):
        load_preset("cpu-demo", ["train.colour=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ValidationError, match="trian"):
        load_preset(bad)
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("no-such-preset")
    with pytest.raises(ValueError, match="section.key=value"):
        apply_override({}, "train.steps")


def test_a_non_finite_gate_threshold_is_an_error():
    for bad in (".nan", ".inf", "-.inf"):
        with pytest.raises(ValidationError, match="evaluate.threshold"):
            load_preset("cpu-demo", [f"evaluate.threshold={bad}"])


def test_yaml_that_does_not_parse_is_a_value_error_naming_where(tmp_path):
    # The CLI turns a ValueError into a usage error; a raw YAMLError was a traceback.
    with pytest.raises(ValueError, match=r"override 'train.steps=\[1': the value is not valid YAML .* quote a string"):
        load_preset("cpu-demo", ["train.steps=[1"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1\n")
    with pytest.raises(ValueError, match=f"{broken} is not valid YAML"):
        load_preset(broken)
