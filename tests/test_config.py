import pytest

from fnclass.config import Config, ConfigError, config_to_toml, load_config
from fnclass.models import resolve_config


def test_shipped_configs_load_and_round_trip(tmp_path):
    for name in ("seed", "fast", "fast95", "cpu"):
        config = resolve_config(load_config(f"configs/{name}.toml"))
        path = tmp_path / f"{name}.toml"
        path.write_text(config_to_toml(config))
        assert load_config(path) == config


def test_seed_config_is_the_papers_recipe():
    config = load_config("configs/seed.toml")
    assert (config.model.name, config.optim.name, config.optim.lr) == ("resnet_attn", "adam", 1e-3)
    assert (config.train.batch_size, config.train.epochs) == (128, 100)
    assert config.data.flip and config.data.crop_padding == 4


def test_overrides_apply_and_parse_toml_values():
    config = load_config("configs/cpu.toml", ["optim.lr=3e-4", "model.name=fast", "model.widths=[8, 16, 16]",
                                             "train.tta=true"])
    assert config.optim.lr == 3e-4 and config.model.name == "fast" and config.model.widths == (8, 16, 16)
    assert config.train.tta is True


@pytest.mark.parametrize("text, expected", [
    ("[model]\nname = 'vgg'\n", r"model\.name = 'vgg' is not allowed: expected one of"),
    ("[train]\nepochs = 'ten'\n", r"train\.epochs = 'ten' is not allowed: expected an integer"),
    ("[train]\nepochz = 3\n", r"unknown key train\.epochz: allowed keys are"),
    ("[trian]\nepochs = 3\n", r"unknown section \[trian\]"),
    ("[optim]\nlr = -1\n", r"optim\.lr = -1\.0 is not allowed"),
    ("[optim\n", r"not valid TOML"),
    ("[train]\nbatch_size = 512\n[data]\ntrain_limit = 100\n", r"train\.batch_size = 512"),
    ("[optim]\nname = 'adam'\nmuon = true\n", r"optim\.muon = True is not allowed"),
    ("[optim]\nwhiten_bias_epochs = 3\n", r"optim\.whiten_bias_epochs = 3\.0 is not allowed: expected 0 unless"),
    ("[data]\nflip = false\nalternate_flips = true\n", r"data\.alternate_flips = True is not allowed"),
    ("[model]\nname = 'resnet_attn'\nwhiten = true\n", r"model\.whiten = True is not allowed"),
])
def test_bad_configs_give_one_line_naming_file_and_key(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        resolve_config(load_config(path), source=str(path))  # the model's own keys are checked by its module
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["lr=3"])


def test_defaults_validate():
    assert Config().validate() == Config()
