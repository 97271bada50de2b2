import dataclasses
import math
import tomllib
import types
import typing

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from fnclass.cli import main
from fnclass.config import (
    SECTION_CLASSES,
    SECTIONS,
    Config,
    ConfigError,
    config_from_dict,
    config_to_toml,
    load_config,
)
from fnclass.models import resolve_config


def test_shipped_configs_load_and_round_trip(tmp_path):
    for name in ("seed", "fast", "fast95", "cpu", "dp"):
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
    ("[train]\nepochz = 3\n", r"unknown key train\.epochz: did you mean train\.epochs\? allowed keys are"),
    ("[trian]\nepochs = 3\n", r"unknown section \[trian\]: did you mean \[train\]\? allowed sections are"),
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


# Hostile configs and flags (issue 12): one line naming the file and the key, exit code 2, nothing written.

FIELDS = [(section, field) for section, cls in zip(SECTIONS, SECTION_CLASSES) for field in dataclasses.fields(cls)]
HINTS = {section: typing.get_type_hints(cls) for section, cls in zip(SECTIONS, SECTION_CLASSES)}
# TOML literals of each kind; a key is given every kind its annotation does not accept.
LITERALS = {"int": "3", "float": "2.5", "str": '"x"', "bool": "true", "list": "[8, 16]", "table": "{ a = 1 }",
            "date": "1979-05-27"}
ACCEPTS = {int: {"int"}, float: {"int", "float"}, str: {"str"}, bool: {"bool"}}


def _accepted(annotation) -> set[str]:
    """The literal kinds a field's annotation takes: ``tuple[int, ...] | None`` takes a list."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (
        annotation,)
    return set().union(*({"list"} if typing.get_origin(option) is tuple else ACCEPTS.get(option, set())
                         for option in options))


def one_line(error: pytest.ExceptionInfo, *expected: str) -> None:
    message = str(error.value)
    assert "\n" not in message and all(text in message for text in expected), message


@pytest.mark.parametrize("section, field", FIELDS, ids=[f"{s}.{f.name}" for s, f in FIELDS])
def test_every_key_refuses_every_wrong_type(tmp_path, section, field):
    accepted = _accepted(HINTS[section][field.name])
    assert accepted, field  # every field has a type this test knows
    path = tmp_path / "bad.toml"
    for kind, literal in LITERALS.items():
        if kind in accepted:
            continue
        path.write_text(f"[{section}]\n{field.name} = {literal}\n")
        with pytest.raises(ConfigError) as error:
            load_config(path)
        one_line(error, str(path), f"{section}.{field.name} = ", "is not allowed: expected")


@pytest.mark.parametrize("key, literal, expected", [
    ("train.epochs", "0", "an integer in 1..1,000,000"),
    ("train.epochs", "1000001", "an integer in 1..1,000,000"),
    ("train.batch_size", "0", "a positive integer"),
    ("train.seed", "-1", "an integer >= 0"),
    ("train.seed", "9223372036854775808", "a 64-bit integer"),  # 2**63: TOML integers are 64-bit
    ("train.epochs", "-9223372036854775809", "a 64-bit integer"),
    ("train.label_smoothing", "1.0", "a number in [0, 1)"),
    ("train.precision", '"fp8"', '"fp32", "bf16", "fp16" or "auto"'),
    ("train.accumulate_steps", "0", "an integer in 1..1024"),
    ("train.ema_decay", "1.0", "a number in [0, 1)"),
    ("train.eval_every", "-1", "an integer >= 0 (0: evaluate after the last epoch only)"),
    ("train.logger", '"wandb"', '"none" or "tensorboard"'),
    ("data.mixup_alpha", "-0.1", "a number in [0, 100]"),
    ("data.mix_prob", "1.5", "a probability in [0, 1]"),
    ("data.val_size", "1.5", "a fraction in (0, 1)"),
    ("data.val_size", "-3", "an integer >= 0"),
    ("train.nan_policy", '"ignore"', '"stop" or "skip"'),
    ("optim.lr", "0", "a positive number"),
    ("optim.lr", "inf", "a finite number"),
    ("optim.lr", "nan", "a finite number"),
    ("optim.eps", "-inf", "a finite number"),
    ("optim.weight_decay", "-1e-4", "a number >= 0"),
    ("optim.b1", "1.0", "a number in [0, 1)"),
    ("optim.b2", "-0.5", "a number in [0, 1)"),
    ("optim.warmup_epochs", "1e7", "a number in [0, 1,000,000]"),
    ("optim.whiten_bias_epochs", "1e300", "a number in [0, 1,000,000]"),
    ("optim.final_lr_fraction", "1.5", "a number in [0, 1]"),
    ("optim.lookahead_decay", "1", "a number in [0, 1)"),
    ("optim.name", '"lion"', "one of adam, adamw, sgd"),
    ("model.num_classes", "1", "an integer >= 2"),
    ("model.bn_momentum", "1.5", "a number in [0, 1]"),
    ("model.whiten_kernel", "5", "an integer in 1..4"),
    ("data.crop_padding", "17", "an integer in 0..16"),
    ("data.cutout", "-1", "an integer in 0..32"),
    ("data.train_limit", "0", "a positive integer"),
    ("data.dataset", '"../mnist"', "a data folder's name"),
    ("checkpoint.keep", "-1", "an integer >= 0"),
    ("model.stem_width", "0", "an integer in 1..65536"),
    ("model.attn_layers", "1001", "an integer in 0..1000"),
    ("model.depths", "[2, 2, 2, 1001]", "integers in 1..1000"),
    ("model.widths", "[8, 0, 8, 8]", "integers in 1..65536"),
])
def test_out_of_range_values_name_the_key_and_the_range(tmp_path, key, literal, expected):
    section, name = key.split(".")
    path = tmp_path / "bad.toml"
    path.write_text(f"[{section}]\n{name} = {literal}\n")
    with pytest.raises(ConfigError) as error:
        resolve_config(load_config(path), source=str(path))  # the model's own keys are checked by its module
    one_line(error, str(path), f"{key} = ", expected)


@pytest.mark.parametrize("text, expected", [
    ("[train]\nbatchsize = 3\n", "unknown key train.batchsize: did you mean train.batch_size?"),
    ("[optim]\nzzz = 3\n", "unknown key optim.zzz: allowed keys are"),
    ("[moddel]\nname = 'tiny'\n", "unknown section [moddel]: did you mean [model]?"),
    ("[zzz]\n", "unknown section [zzz]: allowed sections are model, data, optim, train, checkpoint"),
    ("epochs = 3\n", "epochs = 3 is outside any section: put it under [train]"),
    ("model = 3\n", "[model] must be a table of keys, got 3"),
    ("[train]\n" + "x" * 1000 + " = 1\n", "unknown key train.'xxxxx"),  # a hostile key is cut, not echoed whole
])
def test_unknown_keys_and_sections_suggest_the_nearest(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    one_line(error, str(path), expected)
    assert "x" * 100 not in str(error.value) and len(str(error.value)) < 600  # the allowed keys, not the hostile one


@pytest.mark.parametrize("content, expected", [
    (b"[model]\nname = 'caf\xe9'\n", "not UTF-8 text (byte 19 is 0xe9)"),
    (b"[train\nepochs = 3\n", "not valid TOML (Expected ']'"),
    (b"[train]\nepochs = 3\nepochs = 4\n", "not valid TOML (Cannot overwrite a value"),
    (b"[model]\nwidths = " + b"[" * 20_000 + b"]" * 20_000 + b"\n", "nested too deeply"),
    (b"# padding\n" * 110_000, "over 1,048,576 bytes"),
    (b"base = 'nowhere.toml'\n", "base = 'nowhere.toml': "),
    (b"base = 3\n", "base = 3 is not allowed"),
], ids=["latin-1", "syntax", "repeated key", "deep nesting", "too large", "missing base", "base not a string"])
def test_unreadable_config_files_are_one_line(tmp_path, content, expected):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    one_line(error, str(path), expected)


def test_a_folder_or_a_missing_file_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path)
    one_line(error, str(tmp_path), "is a folder, not a config file")
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "gone.toml")
    one_line(error, "gone.toml: no such config file; give a TOML file or one of the shipped names: cpu")


@pytest.mark.parametrize("override, expected", [
    ("train.epochs", "expected section.key=value, e.g. --set train.epochs=VALUE"),
    ("epochs=3", "e.g. --set train.epochs=VALUE"),
    ("lr", "e.g. --set optim.lr=VALUE"),
    ("zzz", "e.g. --set optim.lr=3e-4"),
    ("train.epochs=ten", "train.epochs = 'ten' is not allowed: expected an integer"),
    ("train.epochs=", "train.epochs = '' is not allowed"),
    ("model.widths=[8, 16", "model.widths = '[8, 16' is not allowed: expected a list"),
    ("optim.lr=1e999", "optim.lr = inf is not allowed: expected a finite number"),
    ("train.seed=1\n[model]\nname = 'fast'", "the value must be one TOML value"),
    ("a.b.c=1", "expected exactly section.key"),
    ("trian.epochs=3", "unknown section [trian]: did you mean [train]?"),
])
def test_bad_overrides_through_the_cli_are_one_line_and_write_nothing(tmp_path, override, expected):
    for args in (["config", "show"], ["train", "--config", "cpu", "--out", str(tmp_path / "run")]):
        result = CliRunner().invoke(main, [*args, "--set", override])
        assert result.exit_code == 2, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
        assert result.stdout == "" and not (tmp_path / "run").exists()


def test_bad_config_file_through_the_cli_is_one_line_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[train]\nepochs = 'many'\n")
    for args in (["config", "show"], ["train", "--out", str(tmp_path / "run")]):
        result = CliRunner().invoke(main, [*args, "--config", str(path)])
        assert result.exit_code == 2 and result.stdout == "", result.output
        assert result.stderr == f"error: {path}: train.epochs = 'many' is not allowed: expected an integer\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_config_show_with_a_multi_line_override_stays_valid_toml(tmp_path):
    result = CliRunner().invoke(main, ["config", "show", "--set", "model.widths=[8,\n16, 16]", "--set",
                                       "model.name=tiny"])
    assert result.exit_code == 0, result.output
    (tmp_path / "shown.toml").write_text(result.stdout)
    assert load_config(tmp_path / "shown.toml").model.widths == (8, 16, 16)


# Fuzzing: any TOML value for any key is a valid Config or one ConfigError line, never another exception.

KEYS = [f"{section}.{field.name}" for section, field in FIELDS]
INTEGERS = st.integers() | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**100, 0, -1, 1])
SCALARS = (INTEGERS | st.floats() | st.booleans() | st.dates()
           | st.text(st.characters(blacklist_categories=("Cs",)), max_size=12))  # TOML text is UTF-8: no surrogates
TOML_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
# Keys to set: every real one, near misses and unknown sections.
TARGETS = st.sampled_from([*KEYS, "train.epochz", "trian.epochs", "model.width", "zzz.a"])
WORDS = ["adam", "adamw", "sgd", "tiny", "fast", "resnet_attn", "fp32", "bf16", "reflect", "zeros", "sdpa", "math",
         "stop", "skip", "constant", "warmup_cosine", "one_cycle", "cifar10", "cifar100"]
# Values of the key's own type (near and across the edges of its range), so that many drawn configs are valid.
TYPED = {"int": st.integers(0, 300) | INTEGERS, "float": st.floats(0, 1) | st.floats(),
         "str": st.sampled_from(WORDS) | st.text(max_size=8), "bool": st.booleans(),
         "list": st.lists(st.integers(0, 70), max_size=5)}


def _typed(key: str):
    """Any TOML value (a quarter of the time), else one of the type the key declares."""
    section, name = key.split(".")
    kinds = _accepted(HINTS[section][name]) if section in HINTS and name in HINTS[section] else set()
    if not kinds:
        return TOML_VALUES
    return st.integers(0, 3).flatmap(lambda pick: TOML_VALUES if pick == 0 else
                                     st.one_of(*(TYPED[kind] for kind in sorted(kinds))))


def _toml_string(text: str) -> str:
    """A TOML basic string: control characters, DEL, quotes and backslashes escaped."""
    return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or c in '"\\\x7f' else c for c in text) + '"'


def _toml(value) -> str:
    """Any drawn value as TOML (tables inline); floats by repr (inf, nan and 1e+300 are TOML too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return value.isoformat()  # a date


def _config_or_one_line(build):
    """``build()`` gives a valid Config or raises one ConfigError line; anything else fails the test."""
    try:
        config = build()
    except ConfigError as error:
        assert "\n" not in str(error) and len(str(error)) < 1000, str(error)
        return None
    assert config.validate() == config
    assert config_from_dict(tomllib.loads(config_to_toml(config))) == config  # what a run writes reads back
    for section, cls in zip(SECTIONS, SECTION_CLASSES):  # every value has its declared type and is finite
        for field in dataclasses.fields(cls):
            value = getattr(getattr(config, section), field.name)
            kinds = _accepted(HINTS[section][field.name])
            if isinstance(value, float):
                assert math.isfinite(value) and "float" in kinds
            elif value is not None and not isinstance(value, tuple):
                assert {int: "int", str: "str", bool: "bool"}[type(value)] in kinds, (field.name, value)
    return config


FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(keys=st.lists(TARGETS, min_size=1, max_size=4, unique=True), draw=st.data())
def test_fuzzed_values_give_a_config_or_one_config_error(tmp_path, keys, draw):
    data = {}
    for key in keys:
        section, name = key.split(".")
        data.setdefault(section, {})[name] = draw.draw(_typed(key), label=key)
    config = _config_or_one_line(lambda: config_from_dict(data, "fuzz"))
    event("a valid config" if config is not None else "a ConfigError")
    if config is not None:
        _config_or_one_line(lambda: resolve_config(config, "fuzz"))
    # The same document through a TOML file: the same outcome.
    path = tmp_path / "fuzz.toml"
    path.write_text("".join(f"{_toml_string(section)} = {_toml(table)}\n" for section, table in data.items()),
                    encoding="utf-8")
    assert _config_or_one_line(lambda: load_config(path)) == config


@FUZZ
@given(values=st.lists(TOML_VALUES, min_size=1, max_size=3), data=st.data())
def test_fuzzed_whole_sections_give_a_config_or_one_config_error(values, data):
    """Whole sections replaced by any value, and the top level given any keys."""
    document = {data.draw(st.sampled_from([*SECTIONS, "base2", "epochs", "trian"])): value for value in values}
    _config_or_one_line(lambda: config_from_dict(document, "fuzz"))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(key=TARGETS | st.text(max_size=12), value=st.text(max_size=20) | TOML_VALUES.map(_toml))
@example(key="data.data_dir", value="\U00010000")  # once written by json.dumps as a surrogate pair: not TOML
@example(key="data.data_dir", value="a\x7fb\x00")  # DEL must be escaped in TOML
def test_fuzzed_set_overrides_through_the_cli(key, value):
    result = CliRunner().invoke(main, ["config", "show", "--set", f"{key}={value}"])
    assert isinstance(result.exception, SystemExit) or result.exception is None, result.exception
    if result.exit_code == 0:  # what it shows is TOML for the same config
        assert config_from_dict(tomllib.loads(result.stdout)) == resolve_config(load_config(None, [f"{key}={value}"]))
        return
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
