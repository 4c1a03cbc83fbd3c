"""Configuration loading and validation (istn.config)."""

import json
import math
from pathlib import Path

import pytest
import yaml

from istn.config import Config, from_dict, load_config
from istn.errors import IstnError

PUBLISHED = {
    "epochs": 100,
    "refine": 50,
    "learning_rate": 0.001,
    "batch_size": 10,
    "val_interval": 10,
    "normalizer_img": "none",
    "normalizer_seg": "none",
    "size": [128, 128],
    "spacing": [1, 1],
}

# Smallest STN input per axis: three times [conv 5x5 valid, avg-pool 2] must leave >= 1
# feature: 36 -> 32 -> 16 -> 12 -> 6 -> 2 -> 1, while 35 -> ... -> 1 -> 0.
SMALLEST = 36


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def _assert_published(cfg):
    for key, value in PUBLISHED.items():
        got = getattr(cfg, key)
        assert got == value, key
        assert type(got) is type(value) or isinstance(value, list), key
    assert all(isinstance(v, int) for v in cfg.size)
    assert all(isinstance(v, float) for v in cfg.spacing)


def test_published_json_loads_unchanged(tmp_path):
    cfg = load_config(_write_json(tmp_path / "config.json", PUBLISHED))
    _assert_published(cfg)
    assert cfg.dim == 2


def test_published_yaml_loads_unchanged(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(PUBLISHED))
    _assert_published(load_config(path))


def test_yml_suffix_and_empty_yaml_give_defaults(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("# nothing set\n")
    assert load_config(path) == Config()


def test_defaults_are_the_published_values():
    cfg = load_config(None)
    assert cfg == Config()
    _assert_published(cfg)


def test_unknown_key_is_named(tmp_path):
    data = dict(PUBLISHED, epocs=5)
    with pytest.raises(IstnError, match="epocs") as info:
        load_config(_write_json(tmp_path / "c.json", data))
    assert str(tmp_path / "c.json") in str(info.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("epochs", "100"),
        ("epochs", True),
        ("batch_size", False),
        ("epochs", 10.5),
        ("learning_rate", "0.001"),
        ("learning_rate", True),
        ("normalizer_img", 3),
        ("size", [128.5, 128]),
        ("size", 128),
        ("size", []),
        ("size", [True, 128]),
        ("spacing", ["1", 1]),
        ("bspline_zero_init", 1),
        ("refine_learning_rate", "fast"),
    ],
)
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(IstnError, match=f"'{key}'"):
        from_dict(dict(PUBLISHED, **{key: value}))


def test_integral_float_in_size_is_accepted_as_int():
    cfg = from_dict(dict(PUBLISHED, size=[64.0, 48]))
    assert cfg.size == [64, 48]
    assert all(type(v) is int for v in cfg.size)


def test_int_for_float_is_converted():
    cfg = from_dict(dict(PUBLISHED, learning_rate=1, refine_learning_rate=2))
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.refine_learning_rate == 2.0 and isinstance(cfg.refine_learning_rate, float)


@pytest.mark.parametrize(
    "key, value",
    [
        ("epochs", 0),
        ("epochs", -3),
        ("batch_size", 0),
        ("batch_size", -1),
        ("val_interval", 0),
        ("learning_rate", 0),
        ("learning_rate", -1e-3),
        ("learning_rate", math.nan),
        ("refine", -1),
        ("refine_batch", -1),
        ("restarts", -1),
        ("refine_learning_rate", 0.0),
        ("smoothness", -0.1),
        ("max_scaling", 0.0),
    ],
)
def test_out_of_range_names_the_key(key, value):
    with pytest.raises(IstnError, match=f"'{key}'"):
        from_dict(dict(PUBLISHED, **{key: value}))


def test_zero_refine_is_allowed():
    assert from_dict(dict(PUBLISHED, refine=0)).refine == 0


@pytest.mark.parametrize("key", ["normalizer_img", "normalizer_seg"])
def test_unknown_normaliser(key):
    with pytest.raises(IstnError, match=f"'{key}'.*zero_mean_unit_var") as info:
        from_dict(dict(PUBLISHED, **{key: "z_score"}))
    assert "z_score" in str(info.value)


def test_all_normalisers_accepted():
    for name in ("none", "zero_mean_unit_var", "range_matching", "zero_one", "threshold_zero"):
        assert from_dict(dict(PUBLISHED, normalizer_img=name, normalizer_seg=name)).normalizer_img \
            == name


def test_unknown_network_scaling():
    with pytest.raises(IstnError, match="'network_scaling'.*auto, none"):
        from_dict(dict(PUBLISHED, network_scaling="minmax"))


def test_unknown_refine_mode():
    with pytest.raises(IstnError, match="'refine_mode'"):
        from_dict(dict(PUBLISHED, refine_mode="both"))


@pytest.mark.parametrize("size", [[130, 128], [128, 126], [64, 64, 38]])
def test_size_not_divisible_by_4(size):
    spacing = [1] * len(size)
    with pytest.raises(IstnError, match="'size'.*divisible by 4"):
        from_dict(dict(PUBLISHED, size=size, spacing=spacing))


@pytest.mark.parametrize("size", [[32, 128], [128, 4], [40, 40, 32]])
def test_size_too_small_gives_smallest_allowed(size):
    spacing = [1] * len(size)
    with pytest.raises(IstnError, match="'size'") as info:
        from_dict(dict(PUBLISHED, size=size, spacing=spacing))
    assert str(SMALLEST) in str(info.value)


def test_smallest_size_is_accepted():
    assert from_dict(dict(PUBLISHED, size=[SMALLEST, SMALLEST])).size == [SMALLEST, SMALLEST]


@pytest.mark.parametrize("size", [[128], [64, 64, 64, 64]])
def test_size_must_have_2_or_3_entries(size):
    with pytest.raises(IstnError, match="'size'"):
        from_dict(dict(PUBLISHED, size=size, spacing=[1] * len(size)))


@pytest.mark.parametrize(
    "size, spacing", [([128, 128], [1, 1, 1]), ([64, 64, 64], [1, 1]), ([128, 128], [1])]
)
def test_spacing_length_mismatch(size, spacing):
    with pytest.raises(IstnError, match="'spacing'"):
        from_dict(dict(PUBLISHED, size=size, spacing=spacing))


@pytest.mark.parametrize("spacing", [[0, 1], [1, -2]])
def test_spacing_must_be_positive(spacing):
    with pytest.raises(IstnError, match="'spacing'"):
        from_dict(dict(PUBLISHED, spacing=spacing))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_spacing_is_rejected(bad):
    with pytest.raises(IstnError, match="'spacing'"):
        from_dict(dict(PUBLISHED, spacing=[bad, 1]))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_size_is_an_istn_error(bad):
    with pytest.raises(IstnError, match="'size'"):
        from_dict(dict(PUBLISHED, size=[bad, 128]))


def test_3d_config():
    cfg = from_dict(dict(PUBLISHED, size=[40, 44, 48], spacing=[1, 1, 2.5]))
    assert cfg.dim == 3
    assert cfg.spacing == [1.0, 1.0, 2.5]


def test_overrides_applied_and_none_ignored(tmp_path):
    path = _write_json(tmp_path / "c.json", PUBLISHED)
    cfg = load_config(path, {"epochs": 7, "batch_size": None, "normalizer_img": "zero_one",
                             "learning_rate": None})
    assert cfg.epochs == 7
    assert cfg.normalizer_img == "zero_one"
    assert cfg.batch_size == PUBLISHED["batch_size"]
    assert cfg.learning_rate == PUBLISHED["learning_rate"]
    # The file itself is unchanged by overrides.
    assert load_config(path).epochs == 100


def test_overrides_without_file_and_validated(tmp_path):
    assert load_config(None, {"refine": 3}).refine == 3
    with pytest.raises(IstnError, match="'epochs'"):
        load_config(_write_json(tmp_path / "c.json", PUBLISHED), {"epochs": 0})
    with pytest.raises(IstnError, match="'bogus'"):
        load_config(None, {"bogus": 1})


def test_missing_config_file_named(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(IstnError, match="nope.json") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_directory_as_config_named(tmp_path):
    with pytest.raises(IstnError, match="not a file"):
        load_config(tmp_path)


def test_invalid_json_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"epochs": 100,, }')
    with pytest.raises(IstnError, match="JSON") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("epochs: [100\nrefine: 3\n")
    with pytest.raises(IstnError) as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"epochs"'])
def test_top_level_not_an_object(tmp_path, text):
    path = tmp_path / "list.json"
    path.write_text(text)
    with pytest.raises(IstnError, match="key: value") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_shape_is_reversed_size():
    cfg = from_dict(dict(PUBLISHED, size=[64, 48]))
    assert cfg.shape == (48, 64)
    cfg3 = from_dict(dict(PUBLISHED, size=[40, 44, 48], spacing=[1, 1, 1]))
    assert cfg3.shape == (48, 44, 40)
    assert isinstance(cfg3.shape, tuple)


def test_to_dict_round_trips():
    cfg = from_dict(dict(PUBLISHED, size=[64, 48], epochs=3, refine_mode="params"))
    again = from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


# ----------------------------------------------------------------------------- example caps

@pytest.fixture
def fresh_cap_warning(monkeypatch):
    import istn.config

    monkeypatch.setattr(istn.config, "_warned_caps", set())


def test_example_caps_cap_every_config_and_warn_once(monkeypatch, capsys, tmp_path,
                                                     fresh_cap_warning):
    monkeypatch.setenv("ISTN_EXAMPLE_EPOCHS", "2")
    monkeypatch.setenv("ISTN_EXAMPLE_REFINE", "3")
    path = tmp_path / "c.json"
    _write_json(path, PUBLISHED)
    cfg = load_config(path, {"epochs": 40})
    assert (cfg.epochs, cfg.refine) == (2, 3)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("istn: warning: capping training epochs at "
                                                    "2 (ISTN_EXAMPLE_EPOCHS) and refinement")
    low = from_dict({"epochs": 1, "refine": 0})  # below the caps: unchanged
    assert (low.epochs, low.refine) == (1, 0)
    assert from_dict({}, legacy=True).epochs == 2  # checkpoints' configs too
    assert capsys.readouterr().err == ""  # one warning per process


def test_example_caps_unset_change_nothing(monkeypatch, capsys, fresh_cap_warning):
    monkeypatch.setenv("ISTN_EXAMPLE_EPOCHS", "")
    assert from_dict(dict(PUBLISHED)) == from_dict(dict(PUBLISHED)) == Config(
        **{**PUBLISHED, "spacing": [1.0, 1.0]})
    assert from_dict({}).epochs == 100 and capsys.readouterr().err == ""


def test_example_refine_cap_alone(monkeypatch, capsys, fresh_cap_warning):
    monkeypatch.setenv("ISTN_EXAMPLE_REFINE", "0")
    cfg = from_dict({})
    assert (cfg.epochs, cfg.refine) == (100, 0)
    assert "refinement iterations at 0" in capsys.readouterr().err


@pytest.mark.parametrize("var,value", [("ISTN_EXAMPLE_EPOCHS", "0"),
                                       ("ISTN_EXAMPLE_EPOCHS", "two"),
                                       ("ISTN_EXAMPLE_REFINE", "-1")])
def test_bad_example_cap_is_named(monkeypatch, var, value, fresh_cap_warning):
    monkeypatch.setenv(var, value)
    with pytest.raises(IstnError, match=var):
        from_dict({})


def test_example_caps_lower_the_benchmark_plan(monkeypatch, fresh_cap_warning):
    from istn.bench import PLANS, _capped

    assert _capped(PLANS["full"]) is PLANS["full"]
    monkeypatch.setenv("ISTN_EXAMPLE_EPOCHS", "1")
    monkeypatch.setenv("ISTN_EXAMPLE_REFINE", "0")
    plan = _capped(PLANS["full"])
    assert (plan["epochs"], plan["brief_epochs"], plan["refine"]) == (1, 1, 1)
    assert PLANS["full"]["epochs"] == 2  # the plan itself is left alone


@pytest.mark.parametrize("name", sorted(p.name for p in
                                        (Path(__file__).parents[1] / "configs").glob("*.json")))
def test_shipped_configs_load(name):
    cfg = load_config(Path(__file__).parents[1] / "configs" / name, {})
    assert isinstance(cfg, Config)
