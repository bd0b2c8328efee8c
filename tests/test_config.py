import pytest

from pipeline.config import ConfigError, FluidConfig, from_dict, load_config


def test_defaults_are_the_dataclass_defaults():
    cfg = load_config()
    assert cfg == FluidConfig()
    assert cfg.model.spec == "smollm2-135m" and cfg.noise.k_max == 16 and cfg.noise.rho == pytest.approx(0.1)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.001\n  max_steps: 7\ndata:\n  corpus: [a.txt, 'b/*.jsonl']\n")
    cfg = load_config(f, ["--train.lr=1e-5", "noise.spans=3", "--noise.mode=bidirectional", "--model.cache_dir=null"])
    assert cfg.train.lr == pytest.approx(1e-5)  # override wins, and "1e-5" (YAML string) becomes a float
    assert cfg.train.max_steps == 7
    assert cfg.data.corpus == ["a.txt", "b/*.jsonl"]
    assert cfg.noise.spans == 3 and cfg.noise.mode == "bidirectional" and cfg.model.cache_dir is None


def test_int_accepted_for_float_and_single_string_for_list():
    cfg = load_config(None, ["--train.lr=1", "--data.corpus=s3://bucket/docs/"])
    assert isinstance(cfg.train.lr, float) and cfg.data.corpus == ["s3://bucket/docs/"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.lrr=1", "unknown config key 'train.lrr'"),
        ("--trian.lr=1", "unknown config section 'trian'"),
        ("--train.max_steps=abc", "'train.max_steps' must be an integer"),
        ("--train.max_steps=1.5", "'train.max_steps' must be an integer"),
        ("--train.lr=fast", "'train.lr' must be a number"),
        ("--train.use_gpu=maybe", "'train.use_gpu' must be true or false"),
        ("--noise.mode=sideways", "'noise.mode' must be one of ['causal', 'bidirectional']"),
        ("--train.lr", "must look like --section.key=value"),
        ("--lr=1", "must look like section.key"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_bad_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        from_dict({"train": 3})
    with pytest.raises(ConfigError, match="unknown config section 'nope'"):
        from_dict({"nope": {}})
