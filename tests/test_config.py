from pathlib import Path

import pytest

from lorafit.config import Config, dump_config, load_config
from lorafit.errors import LorafitError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_measured_recipe():
    cfg = Config()
    assert cfg.model.name == "embedded:smollm2-135m-instruct"
    assert cfg.model.quantization == "none"
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "each preset starts with a comment saying what it is for"


def test_precedence_defaults_yaml_set_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.002\n  epochs: 5\nlora:\n  r: 4\n")
    cfg = load_config(f, ["train.lr=5e-4", "model.quantization=4bit"], {"train.epochs": 1})
    assert cfg.train.lr == 5e-4  # --set beats YAML
    assert cfg.train.epochs == 1  # dedicated flag beats --set/YAML
    assert cfg.lora.r == 4  # YAML beats default
    assert cfg.model.quantization == "4bit"
    assert cfg.train.batch_size == Config().train.batch_size  # default kept


def test_set_parses_values_like_yaml():
    cfg = load_config(
        None,
        [
            "train.max_steps=20",
            "lora.target_modules=[q_proj, v_proj]",
            "train.gradient_checkpointing=true",
        ],
    )
    assert cfg.train.max_steps == 20
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.gradient_checkpointing is True


def test_flags_keep_paths_as_strings():
    cfg = load_config(None, None, {"data.train": "yes", "output_dir": "123"})
    assert cfg.data.train == "yes" and cfg.output_dir == "123"


@pytest.mark.parametrize(
    "setting, words",
    [
        ("train.learnin_rate=1", ["train.learnin_rate", "unknown key", "learnin_rate"]),
        ("modle.name=x", ["unknown key", "modle"]),
        ("train.lr=fast", ["train.lr"]),
        ("train.lr=-1", ["train.lr", "greater than 0"]),
        ("model.quantization=3bit", ["model.quantization"]),
        ("train.lr", ["section.key=value"]),
    ],
)
def test_bad_overrides_name_the_key(setting, words):
    with pytest.raises(LorafitError) as e:
        load_config(None, [setting])
    for w in words:
        assert w in str(e.value)


def test_unknown_yaml_key_is_an_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epochz: 3\n")
    with pytest.raises(LorafitError, match=r"train\.epochz: unknown key"):
        load_config(f)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(f) == cfg
