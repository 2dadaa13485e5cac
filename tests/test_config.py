import pytest
import yaml

from ips.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    SelectionConfig,
    TaskConfig,
    TrainConfig,
    load_config,
    save_config,
)


def test_defaults_round_trip(tmp_path):
    cfg = ExperimentConfig()
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "encoder": "ips_cnn_tiny",
                    "tasks": [
                        {"name": "a", "kind": "binary"},
                        {"name": "b", "kind": "multiclass", "num_classes": 4},
                    ],
                },
                "selection": {"memory_size": 8},
            }
        )
    )
    cfg = load_config(
        path,
        [
            "train.lr=3e-4",
            "selection.iter_size=16",
            "train.vram_budget_gb=null",
            "model.pretrained=/some/file.pth",
            "train.amp=false",
        ],
    )
    assert cfg.model.encoder == "ips_cnn_tiny"
    assert [t.name for t in cfg.model.tasks] == ["a", "b"] and cfg.model.tasks[1].num_classes == 4
    assert cfg.selection == SelectionConfig(memory_size=8, iter_size=16)
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.vram_budget_gb is None and cfg.train.amp is False
    assert cfg.model.pretrained == "/some/file.pth"


@pytest.mark.parametrize(
    ("data", "overrides", "match"),
    [
        ({"selction": {}}, [], r"unknown config key 'selction'.*did you mean 'selection'"),
        (
            {"selection": {"memory_sise": 4}},
            [],
            r"'selection.memory_sise'.*did you mean 'selection.memory_size'",
        ),
        ({}, ["train.learning_rate=1"], r"'train.learning_rate'"),
        ({}, ["trian.lr=1"], r"did you mean 'train'"),
        ({}, ["train.lr"], r"expected section.key=value"),
        ({"selection": {"memory_size": 0}}, [], r"selection.memory_size: M must be >= 1"),
        ({"selection": {"iter_size": -1}}, [], r"selection.iter_size"),
        ({"selection": {"score": "softmax"}}, [], r"selection.score: must be one of"),
        ({"train": {"lr": "fast"}}, [], r"train.lr: expected a number"),
        ({"train": {"epochs": 1.5}}, [], r"train.epochs: expected an integer"),
        ({"model": {"d_model": 100, "n_heads": 8}}, [], r"model.n_heads"),
        ({"model": {"tasks": []}}, [], r"model.tasks"),
        ({"model": {"tasks": [{"name": "a", "kind": "segmentation"}]}}, [], r"kind: must be one of"),
        ({"model": {"tasks": [{"name": "a"}, {"name": "a"}]}}, [], r"unique"),
        ({"model": {"encoder": "features"}}, [], r"model.feature_dim"),
        ({"train": {"batch_size": 4, "micro_batch_size": 8}}, [], r"train.micro_batch_size"),
    ],
)
def test_bad_config(tmp_path, data, overrides, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=match):
        load_config(path, overrides)


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_frozen():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_task_properties():
    assert TaskConfig(name="x", kind="binary").n_outputs == 1
    assert TaskConfig(name="x", kind="multilabel", num_classes=10).n_outputs == 10
    assert TaskConfig(name="x", label_column="col").column == "col"
    assert ModelConfig().tasks[0].column == "label"


def _float_keys() -> list[str]:
    """Every `section.key` whose type admits a float (float or float | None), read from the type hints."""
    import dataclasses
    import typing

    keys = []
    for section in dataclasses.fields(ExperimentConfig):
        hints = typing.get_type_hints(
            section.type if isinstance(section.type, type) else type(section.default_factory())
        )
        for name, tp in hints.items():
            if tp is float or float in typing.get_args(tp):
                keys.append(f"{section.name}.{name}")
    return keys


def test_every_float_key_is_known():
    keys = _float_keys()
    # the keys the audit found accepting inf are among them: the listing is not empty or partial
    assert {"train.lr", "train.annotation_weight", "train.grad_clip", "pretrain.lr"} <= set(keys)


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", ["inf", ".inf", "-.inf", "nan", ".nan", "-inf"])
def test_non_finite_numbers_are_refused_for_every_float_key(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number"):
        load_config(None, [f"{key}={value}"])


def test_non_finite_number_in_a_yaml_file_and_in_code(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  grad_clip: .inf\n")
    with pytest.raises(ConfigError, match=r"^train.grad_clip: must be a finite number"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^train.lr: must be a finite number"):
        ExperimentConfig(train=TrainConfig(lr=float("inf")))


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("train.learning_rate=1e-4", "train.lr"),
        ("train.LR=1e-4", "train.lr"),
        ("train.n_epochs=3", "train.epochs"),
        ("train.patience=3", "train.early_stopping_patience"),
        ("train.wd=0.1", "train.weight_decay"),
        ("selection.M=8", "selection.memory_size"),
        ("selection.I=8", "selection.iter_size"),
        ("model.backbone=x", "model.encoder"),
        ("train.epcohs=3", "train.epochs"),
    ],
)
def test_did_you_mean_uses_names_and_synonyms(override, meant):
    with pytest.raises(ConfigError, match=rf"did you mean '{meant}'\?$"):
        load_config(None, [override])
