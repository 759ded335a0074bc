from pathlib import Path

import pytest

from mmcst.config import Config, ConfigError, from_dict, load_config, to_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_overrides():
    cfg = load_config(overrides=["train.epochs=3", "model.mmcst.tokens=local", "infer.scales=[1.0,0.5]"])
    assert isinstance(cfg, Config)
    assert cfg.train.epochs == 3
    assert cfg.model.mmcst.tokens == "local"
    assert cfg.infer.scales == [1.0, 0.5]


def test_real_boolean_overrides():
    assert load_config(overrides=["infer.flip=false"]).infer.flip is False
    assert load_config(overrides=["infer.flip=true"]).infer.flip is True


def test_defaults_chain_merges_parent_first(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ntrain:\n  epochs: 7\n  batch_size: 4\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\nname: child\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.name, cfg.train.epochs, cfg.train.batch_size) == ("child", 9, 4)


@pytest.mark.parametrize("override, field", [
    ("model.mmcst.fusion=F9", "model.mmcst.fusion"),
    ("data.dataset=imagenet", "data.dataset"),
    ("model.name=segformer", "model.name"),
    ("model.mmcst.score=logits", "model.mmcst.score"),
    ("model.mmcst.cls_token_weight=-0.5", "model.mmcst.cls_token_weight"),
    ("model.mmcst.score_decay=1.5", "model.mmcst.score_decay"),
])
def test_bad_choice_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[override])


def test_unknown_key_and_bad_type_are_errors(tmp_path):
    with pytest.raises(ConfigError):
        load_config(overrides=["train.epochz=3"])
    with pytest.raises(ConfigError):
        load_config(overrides=["train.epochs=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.epochs"])


def test_yaml_round_trip():
    cfg = load_config(overrides=["name=x", "model.mmcst.lambda_text=0.5"])
    again = from_dict(__import__("yaml").safe_load(to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name
