import pytest

from adaptflow.config import Config, load_config
from adaptflow.errors import ConfigError
from adaptflow.names import check_names


def test_defaults_match_the_shipped_default_yaml():
    assert load_config("configs/default.yaml") == Config()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone:\n  image_size: 96\nhead:\n  kind: mlp\n")
    cfg = load_config(path, ["backbone.image_size=64", "seed=3", "backbone.weights=random"])
    assert (cfg.backbone.image_size, cfg.head.kind, cfg.seed, cfg.backbone.weights) == (64, "mlp", 3, "random")


def test_fingerprint_changes_with_settings():
    assert Config().fingerprint() == Config().fingerprint()
    assert Config().fingerprint() != load_config(None, ["seed=1"]).fingerprint()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["backbone.nmae=x"],
            "backbone.nmae: unknown key (valid keys here: name, weights, download, layer, image_size)",
        ),
        (["bogus=1"], "bogus: unknown key (valid keys here: seed, ingest, backbone"),
        (["head.kind=forest"], "head.kind: Input should be 'linear' or 'mlp'"),
        (["extract.batch_size=0"], "extract.batch_size: Input should be greater than or equal to 1"),
        (["seed"], "--set expects key=value"),
        (["seed.x=1"], "seed: Input should be a valid integer (got {'x': 1})"),
    ],
)
def test_invalid_settings_name_the_key_and_the_choices(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_malformed_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping of settings"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_a_config_path_that_is_no_yaml_file_is_one_clear_line(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match=r"is not text \(not UTF-8\): give the path of a YAML file"):
        load_config(tmp_path / "binary.yaml")
    with pytest.raises(ConfigError, match="is a folder; give the path of a YAML file"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adapt.seeds=[1,2", "--set adapt.seeds: the value '[1,2' is not valid YAML (expected ',' or ']'"),
        ("adapt.hparams=!!python/object:os.system", "could not determine a constructor for the tag"),
    ],
)
def test_a_set_value_that_is_not_yaml_is_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "quote it for a string" in str(err.value)


def test_a_section_given_a_value_in_the_file_is_said_of_the_file_not_of_a_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adapt: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path), [])
    assert "adapt: Input should be a valid dictionary" in str(e.value) and "--set" not in str(e.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("backbone.name=resnet9000", "backbone.name: unknown backbone 'resnet9000'; valid backbones: "),
        ("adapt.method=gan", "adapt.method: unknown method 'gan'; valid methods: adda, auto, cdan"),
        ("adapt.methods=[dann, gan]", "adapt.methods: unknown algorithm 'gan'; valid algorithms: adda, cdan"),
        ("adapt.image_methods=[gan]", "adapt.image_methods: unknown algorithm 'gan'"),
        ("adapt.policy=[im, vibes]", "adapt.policy: unknown validator 'vibes'; valid validators: bnm, dev, entropy"),
        ("promotion.policy=[vibes]", "promotion.policy: unknown validator 'vibes'"),
        ("adapt.hparams={lamda: 1}", "adapt.hparams: unknown hyperparameter 'lamda'"),
    ],
)
def test_names_are_checked_by_their_registries_where_a_run_starts(override, message):
    assert load_config(None, [override])  # the config alone parses: it checks types and ranges, not names
    with pytest.raises(ConfigError) as err:
        check_names(load_config(None, [override]))
    assert message in str(err.value) and str(err.value).startswith("invalid config:\n")


def test_every_bad_name_is_listed_at_once():
    cfg = load_config(None, ["backbone.name=nope", "adapt.policy=[vibes]", "adapt.hparams={lamda: 1}"])
    with pytest.raises(ConfigError) as err:
        check_names(cfg)
    assert [line.split(":")[0].strip() for line in str(err.value).splitlines()[1:]] == [
        "backbone.name",
        "adapt.hparams",
        "adapt.policy",
    ]
    assert check_names(Config()) == Config()
