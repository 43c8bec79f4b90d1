import pytest

from prx.config import MODEL_PRESETS, Config, config_from_dict, load_config, validate
from prx.errors import ConfigError


def test_defaults_are_the_recipe_and_valid():
    cfg = Config()
    validate(cfg)
    assert (cfg.objective.t_mean, cfg.objective.t_std, cfg.objective.shift, cfg.objective.uniform_fraction) == (0, 1, 3, 0.1)
    assert cfg.objective.t_clamp == 0.05 and cfg.data.caption_dropout == 0.1
    assert (cfg.ema.decay, cfg.ema.update_every) == (0.999, 10)
    assert (cfg.model.patch_size, cfg.model.bottleneck_dim, cfg.model.num_layers, cfg.model.hidden_dim) == (32, 256, 24, 1024)


def test_demo_loads_with_overrides_and_types():
    cfg = load_config("configs/demo.yaml", ["train.batch_size=32", "optimizer.lr=3e-4", "sampling.guidance_interval=[0.1,0.9]"])
    assert cfg.name == "demo"
    assert cfg.train.batch_size == 32 and isinstance(cfg.train.batch_size, int)
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.sampling.guidance_interval == [0.1, 0.9]
    # YAML 1.1 reads unquoted on/off as booleans: a string key takes them back
    assert load_config("demo", ["train.compile=off"]).train.compile == "off"
    assert load_config("demo", ["train.compile=on"]).train.compile == "on"
    # the no-argument default is the demo
    assert load_config(None).to_dict() == load_config("demo").to_dict()


def test_preset_fills_and_explicit_keys_win():
    cfg = config_from_dict({"model": {"preset": "prx-small", "num_layers": 12}})
    assert cfg.model.hidden_dim == MODEL_PRESETS["prx-small"]["hidden_dim"] == 1792
    assert cfg.model.num_heads == 28 and cfg.model.num_layers == 12


def test_yaml_round_trip(tmp_path):
    cfg = load_config("demo", ["train.steps=7"])
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.batchsize=3"], "unknown config key 'train.batchsize': did you mean 'train.batch_size'"),
        (["trian.steps=3"], "unknown config key 'trian'"),
        (["train.batch_size=abc"], "train.batch_size must be an integer"),
        (["train.batch_size=2.5"], "train.batch_size must be an integer"),
        (["logging.tensorboard=maybe"], "logging.tensorboard must be true or false"),
        (["model.patch_size=12"], "model.patch_size=12 does not divide data.resolution=64"),
        (["model.bottleneck_dim=1000"], "model.bottleneck_dim=1000 is larger than the patch dimension"),
        (["optimizer.lr=-1e-3"], "optimizer.lr must be positive"),
        (["model.preset=huge"], "unknown model preset 'huge'"),
        (["model.num_heads=5"], "not divisible by model.num_heads=5"),
        (["sampling.sampler=ddim"], "sampling.sampler must be 'euler' or 'heun'"),
        (["data.caption_dropout=1.5"], "data.caption_dropout must be in [0, 1)"),
        (["train.steps"], "is not of the form section.key=value"),
        (["train.time_budget_minutes=30"], "train.time_limit_minutes=13 (the safety net that stops a run) is shorter "
                                           "than"),
    ],
)
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides)
    assert fragment in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist|not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: [demo\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)
