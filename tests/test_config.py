"""Config loading: YAML -> typed frozen dataclasses, _base_ inheritance, overrides, clear errors."""

from pathlib import Path

import pytest

from detr_kit.config import Config, ConfigError, config_from_dict, load_config, save_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.name == path.stem


def test_detr_r50_holds_the_paper_recipe():
    cfg = load_config("configs/detr_r50.yaml")
    assert (cfg.train.lr, cfg.train.lr_backbone, cfg.train.weight_decay, cfg.train.clip_max_norm) == (1e-4, 1e-5, 1e-4, 0.1)
    assert (cfg.train.epochs, cfg.train.lr_drop_epochs) == (500, (400,))
    assert (cfg.data.eval_size, cfg.data.max_size) == (800, 1333)
    assert (cfg.model.num_queries, cfg.model.dim_feedforward, cfg.model.loss.eos_coef) == (100, 2048, 0.1)


def test_overrides_are_typed(tmp_path):
    cfg = load_config("configs/detr_r50.yaml", ["model.num_classes=91", "train.lr=3e-4", "data.train_scales=[64,96]"])
    assert cfg.model.num_classes == 91
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.train_scales == (64, 96)
    with pytest.raises(ConfigError, match=r"model\.num_queries must be int, got 'many'"):
        load_config("configs/detr_r50.yaml", ["model.num_queries=many"])
    with pytest.raises(ConfigError, match="has no '=' — write overrides as section.key=value"):
        load_config("configs/detr_r50.yaml", ["model.num_queries"])


def test_off_and_no_stay_words_in_files_and_overrides(tmp_path):
    # YAML 1.1 would read `amp: off` as False, which no amp setting accepts
    path = tmp_path / "amp_off.yaml"
    path.write_text("_base_: %s\ntrain: {amp: off}\ndata: {hflip: no}\n" % Path("configs/detr_r50.yaml").resolve())
    cfg = load_config(path)
    assert (cfg.train.amp, cfg.data.hflip) == ("off", False)
    cfg = load_config("configs/detr_r50.yaml", ["train.amp=off", "data.hflip=yes", "model.compile=False"])
    assert (cfg.train.amp, cfg.data.hflip, cfg.model.compile) == ("off", True, False)
    with pytest.raises(ConfigError, match="data.hflip"):
        load_config("configs/detr_r50.yaml", ["data.hflip=maybe"])


def test_misspelled_key_names_file_key_and_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_querys: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert str(bad) in message and "'model.num_querys'" in message and "did you mean 'model.num_queries'" in message
    with pytest.raises(ConfigError, match=r"did you mean 'train\.epochs'"):
        load_config("configs/detr_r50.yaml", ["train.epoch=3"])


def test_base_inheritance_and_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  num_queries: 7\n  hidden_dim: 64\ntrain:\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nmodel:\n  hidden_dim: 32\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.model.num_queries, cfg.model.hidden_dim, cfg.train.lr, cfg.name) == (7, 32, 0.5, "child")
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "orphan.yaml")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1", "train.lr"),
        ("model.num_classes=0", "model.num_classes"),
        ("model.backbone.name=resnet51", "model.backbone.name"),
        ("model.arch=deformable", "model.arch"),  # moved: model.deformable
        ("model.hidden_dim=250", "model.hidden_dim"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.deformable.num_feature_levels=7", "model.deformable.num_feature_levels"),
        ("model.deformable.two_stage=true", "model.deformable.box_refine"),
        ("model.attention_dropout=1.0", "model.attention_dropout"),
        ("model.activation_dropout=-0.1", "model.activation_dropout"),
    ],
)
def test_invalid_values_are_rejected_with_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/detr_r50.yaml", [override])


def test_wrong_type_in_file_and_not_yaml(tmp_path):
    (tmp_path / "t.yaml").write_text("train:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: train\.epochs must be int"):
        load_config(tmp_path / "t.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config("configs/detr_r50.yaml", ["model.num_classes=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg  # the saved file keeps the run's name
    assert config_from_dict(cfg.to_dict()) == cfg


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.model.num_queries = 5  # type: ignore[misc]


@pytest.mark.parametrize("tiny", ["detr", "deformable"])
def test_attention_and_activation_dropout_set_apart_from_model_dropout(tiny):
    """model.attention_dropout / activation_dropout reach every layer, and each one alone makes training random."""
    import torch

    from detr_kit.build import build_model
    from detr_kit.fast.feed_forward import ReLUDropout
    from detr_kit.models.transformer import MultiheadAttention
    from tests.tiny_models import TINY_DEFORMABLE, TINY_DETR

    base = TINY_DETR if tiny == "detr" else TINY_DEFORMABLE
    images = torch.randn(1, 3, 64, 64)

    def build(*overrides):
        torch.manual_seed(0)
        return build_model(load_config("configs/detr_r50.yaml", [*base, *overrides])).train()

    def random_in_training(model) -> bool:
        first = model(images).logits
        return not torch.equal(first, model(images).logits)

    model = build("model.attention_dropout=0.25", "model.activation_dropout=0.5")
    attention = [m.dropout for m in model.modules() if isinstance(m, MultiheadAttention)]
    activation = [m.p for m in model.modules() if isinstance(m, ReLUDropout)]  # the fast layers' ReLU + dropout
    assert attention and set(attention) == {0.25}
    assert len(activation) == 4 and set(activation) == {0.5}  # 2 encoder + 2 decoder layers
    assert not random_in_training(build())  # model.dropout=0.0 in the tiny models: nothing random
    assert random_in_training(build("model.activation_dropout=0.5"))
    assert random_in_training(build("model.attention_dropout=0.5"))
    unset = build("model.dropout=0.2")
    assert {m.dropout for m in unset.modules() if isinstance(m, MultiheadAttention)} == {0.2}  # null = model.dropout


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.backbone.vit.num_heads=5"], "model.backbone.vit.num_heads"),  # 5 does not divide 384
        (["model.backbone.vit.conv_radius=1"], "model.backbone.vit.num_heads"),  # ViT-S's 6 heads < 9
        (["model.backbone.vit.conv_radius=1", "model.backbone.vit.num_heads=12"], "model.backbone.vit.use_cls_token"),
        (["model.backbone.vit.conv_radius=1", "model.backbone.vit.num_heads=12", "model.backbone.vit.use_cls_token=false",
          "model.backbone.vit.relative_position=true"], "model.backbone.vit.relative_position"),
        (["model.backbone.vit.position_interpolation=bilinear"], "model.backbone.vit.position_interpolation"),
        (["model.backbone.vit.relative_position_max_distance=-1"], "model.backbone.vit.relative_position_max_distance"),
    ],
)
def test_invalid_vit_attention_options_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/detr_vit.yaml", overrides)


def test_convolutional_vit_options_load():
    cfg = load_config("configs/detr_vit.yaml", ["model.backbone.name=vit_tiny", "model.backbone.vit.num_heads=12",
                                                "model.backbone.vit.conv_radius=1", "model.backbone.vit.use_cls_token=false"])
    assert cfg.model.backbone.vit.conv_radius == 1 and cfg.model.backbone.vit.num_heads == 12
