"""The config loader (OmegaConf structured configs): dataclass defaults < defaults mapping <
YAML file < dotted overrides, one-line errors naming key, value and source, validate()."""
from __future__ import annotations  # annotations must resolve through get_type_hints

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from llave_ds.config import ConfigError, check_choices, config_from_dict, config_to_dict, dump_config, load_config

VALIDATE_CALLS: list[str] = []


@dataclass
class ModelSection:
    path: str = ""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    layers: int = 2

    def __post_init__(self):
        if self.layers < 0:
            raise ValueError(f"model.layers must be >= 0, got {self.layers}")


@dataclass
class ObjectiveSection:
    temperature: float = 0.05
    alpha: float = 9.0
    false_negative_threshold: Optional[float] = None

    def validate(self) -> None:
        VALIDATE_CALLS.append("objective")
        if self.temperature <= 0:
            raise ValueError("objective.temperature must be > 0")


@dataclass
class DataSection:
    subsets: Optional[list[str]] = None
    shuffle: bool = True
    batch_size: int = 8
    image_root: Optional[str] = None

    def validate(self) -> None:
        VALIDATE_CALLS.append("data")


@dataclass
class Root:
    name: str = "run"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    data: DataSection = field(default_factory=DataSection)
    eval: Optional[ObjectiveSection] = None

    def validate(self) -> None:
        VALIDATE_CALLS.append("root")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")


@dataclass
class Required:
    out_dir: str
    model: ModelSection = field(default_factory=ModelSection)


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(Root, *args, **kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)  # one line for the CLI
    return info.value


# --------------------------------------------------------------------------- layering

def test_defaults_only_give_fresh_dataclass_instances():
    cfg = load_config(Root)
    assert cfg == Root() and type(cfg) is Root and type(cfg.model) is ModelSection and cfg.eval is None
    cfg.objective.alpha = 1.0
    assert load_config(Root).objective.alpha == 9.0


def test_override_beats_file_beats_defaults_mapping_beats_dataclass(tmp_path):
    p = write(tmp_path, "model:\n  path: /from/yaml\n  dtype: float32\nobjective:\n  alpha: 2\n  temperature: 0.1\n")
    cfg = load_config(Root, p, ["objective.alpha=4.5", "model.path=/from/cli"],
                      defaults={"objective": {"temperature": 0.2, "false_negative_threshold": 0.9}, "seed": 7})
    assert cfg.model.path == "/from/cli"                  # override beats file
    assert cfg.model.dtype == "float32"                   # file beats dataclass default
    assert cfg.objective.alpha == 4.5
    assert cfg.objective.temperature == 0.1               # file beats defaults mapping
    assert cfg.objective.false_negative_threshold == 0.9  # defaults mapping beats dataclass
    assert cfg.seed == 7 and cfg.data.shuffle is True     # untouched keys keep their defaults
    assert load_config(Root, p, ["seed=1", "seed=2"]).seed == 2  # later overrides win


def test_file_values_scientific_notation_and_empty_blocks(tmp_path):
    p = write(tmp_path, "objective: {alpha: 3, temperature: 1e-2}\ndata: {subsets: [A, B]}\nmodel:\n")
    cfg = load_config(Root, p)
    assert type(cfg.objective.alpha) is float and cfg.objective.alpha == 3.0
    assert cfg.objective.temperature == 0.01              # 1e-2 without a dot is a float
    assert cfg.data.subsets == ["A", "B"]
    assert cfg.model == ModelSection()                     # an empty section block changes nothing
    assert load_config(Root, write(tmp_path, "# nothing\n", "empty.yaml")) == Root()


@pytest.mark.parametrize("override,get,expected", [
    ("objective.alpha=4", lambda c: c.objective.alpha, 4.0),
    ("objective.temperature=1e-3", lambda c: c.objective.temperature, 0.001),
    ("objective.false_negative_threshold=null", lambda c: c.objective.false_negative_threshold, None),
    ("objective.false_negative_threshold=0.9", lambda c: c.objective.false_negative_threshold, 0.9),
    ("data.batch_size=16", lambda c: c.data.batch_size, 16),
    ("data.shuffle=false", lambda c: c.data.shuffle, False),
    ("data.shuffle=yes", lambda c: c.data.shuffle, True),
    ("data.subsets=[A,B]", lambda c: c.data.subsets, ["A", "B"]),
    ("data.subsets=A,B", lambda c: c.data.subsets, ["A", "B"]),       # a comma list without brackets
    ("data.subsets=A, B ,C", lambda c: c.data.subsets, ["A", "B", "C"]),
    ("data.subsets=A", lambda c: c.data.subsets, ["A"]),
    ("data.subsets=", lambda c: c.data.subsets, []),
    ("data.subsets=null", lambda c: c.data.subsets, None),
    ("data.image_root=", lambda c: c.data.image_root, ""),
    ("data.image_root=~", lambda c: c.data.image_root, None),
    ("model.path=/a=b", lambda c: c.model.path, "/a=b"),
    ("model.path=", lambda c: c.model.path, ""),
    ("model.dtype=float32", lambda c: c.model.dtype, "float32"),
    ("name=123", lambda c: c.name, "123"),                            # str fields take the text literally
    ("name=yes", lambda c: c.name, "yes"),
    ("name=1e3", lambda c: c.name, "1e3"),
    ("name=a: {b", lambda c: c.name, "a: {b"),
    ("eval.alpha=2", lambda c: c.eval, ObjectiveSection(alpha=2.0)),  # an Optional section comes alive
    ("objective={alpha: 1, temperature: 0.3}", lambda c: c.objective, ObjectiveSection(alpha=1.0, temperature=0.3)),
])
def test_override_values(override, get, expected):
    value = get(load_config(Root, overrides=[override]))
    assert value == expected and type(value) is type(expected)


def test_optional_section_can_be_reset_to_null():
    assert load_config(Root, overrides=["eval.alpha=2", "eval=null"]).eval is None


# --------------------------------------------------------------------------- errors

def test_bad_choice_names_key_value_choices_suggestion_and_source(tmp_path):
    e = error(overrides=["model.dtype=bfloat"])
    assert str(e) == ("Invalid value for 'model.dtype' (from override 'model.dtype=bfloat'): expected one of "
                      "'float32', 'bfloat16', got 'bfloat'. Did you mean 'bfloat16'?")
    assert e.key == "model.dtype" and e.source == "override 'model.dtype=bfloat'"
    p = write(tmp_path, "model:\n  dtype: 32\n")
    e = error(p)
    assert str(e).startswith(f"Invalid value for 'model.dtype' (from {p}): expected one of") and "got 32" in str(e)


def test_unknown_override_key_suggests_and_lists_valid_keys():
    e = error(overrides=["objective.alpah=3"])
    assert str(e) == ("Unknown key 'objective.alpah' (from override 'objective.alpah=3'). Did you mean "
                      "'objective.alpha'? Valid keys under 'objective': temperature, alpha, false_negative_threshold.")
    assert e.key == "objective.alpah"


def test_unknown_key_at_the_wrong_level_points_to_its_section():
    msg = str(error(overrides=["temperature=0.1"]))
    assert "Did you mean 'objective.temperature'?" in msg and "at the top level: name, seed, model" in msg


def test_unknown_file_key_names_the_file(tmp_path):
    p = write(tmp_path, "data:\n  batchsize: 4\n")
    e = error(p)
    assert f"Unknown key 'data.batchsize' (from {p}). Did you mean 'data.batch_size'?" in str(e)
    assert e.key == "data.batchsize" and e.source == str(p)


@pytest.mark.parametrize("override,value", [
    ("data.batch_size=abc", "'abc'"),
    ("data.batch_size=2.5", "'2.5'"),
    ("data.batch_size=1e3", "'1000.0'"),  # scientific notation is a float, not an int
    ("data.batch_size=true", "'True'"),
    ("objective.alpha=high", "'high'"),
    ("data.shuffle=maybe", "'maybe'"),
    ("objective.false_negative_threshold=abc", "'abc'"),
])
def test_type_errors_name_key_value_and_source(override, value):
    key = override.split("=")[0]
    e = error(overrides=[override])
    assert str(e).startswith(f"Invalid value for '{key}' (from override '{override}'): ") and value in str(e)
    assert e.key == key


def test_type_error_in_a_file_names_the_file(tmp_path):
    p = write(tmp_path, "objective:\n  alpha: high\n")
    assert str(error(p)).startswith(f"Invalid value for 'objective.alpha' (from {p}): Value 'high'")
    p = write(tmp_path, "model:\n  path: null\n", "null.yaml")  # (an override takes "null" as text)
    assert str(error(p)).startswith(f"Invalid value for 'model.path' (from {p}): ")


@pytest.mark.parametrize("override,needle", [
    ("objective.alpha.x=1", "'objective.alpha' is a value, not a section"),
    ("model=3", "Invalid value for 'model' (from override 'model=3')"),
    ("data.subsets=[A", "cannot read '[A' as YAML"),
    ("objective.alpha", "expected 'key.sub=value' (missing '=')"),
    ("=3", "must be dotted names"),
    ("objective..alpha=3", "must be dotted names"),
])
def test_malformed_overrides(override, needle):
    assert needle in str(error(overrides=[override]))


def test_config_file_problems_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(error(missing)) == f"Config file not found: {missing}"
    for text in ["- a\n- b\n", "a: [1\n"]:
        p = write(tmp_path, text)
        assert str(p) in str(error(p))


def test_duplicate_key_in_a_file_is_refused(tmp_path):
    msg = str(error(write(tmp_path, "objective: {alpha: 1}\nobjective: {alpha: 2}\n")))
    assert "found duplicate key objective" in msg


def test_missing_required_key_and_post_init_errors():
    with pytest.raises(ConfigError, match="Missing required key 'out_dir'"):
        load_config(Required)
    assert load_config(Required, overrides=["out_dir=/o"]).out_dir == "/o"
    assert str(error(overrides=["model.layers=-1"])) == "model.layers must be >= 0, got -1"


def test_config_from_dict_names_its_source():
    with pytest.raises(ConfigError) as info:
        config_from_dict(Root, {"data": {"shuffle": "maybe"}}, source="test-dict")
    assert "'data.shuffle' (from test-dict)" in str(info.value) and info.value.source == "test-dict"
    assert config_from_dict(Root, None) == Root()


# --------------------------------------------------------------------------- validate()

def test_validate_runs_children_first_then_root():
    VALIDATE_CALLS.clear()
    load_config(Root, overrides=["eval.alpha=1"])
    assert VALIDATE_CALLS[-1] == "root"
    assert sorted(VALIDATE_CALLS[:-1]) == ["data", "objective", "objective"]  # eval too


def test_validate_error_is_prefixed_with_the_section_path():
    assert str(error(overrides=["objective.temperature=0"])) == "objective: objective.temperature must be > 0"
    assert str(error(overrides=["eval.temperature=-1"])) == "eval: objective.temperature must be > 0"
    e = error(overrides=["seed=-1"])
    assert str(e) == "seed must be >= 0" and e.key is None


def test_check_choices_for_configs_built_in_python():
    check_choices(ModelSection(dtype="float32"), "model.")
    with pytest.raises(ValueError, match=r"^model.dtype must be one of float32, bfloat16, got 'fp8'$"):
        check_choices(ModelSection(dtype="fp8"), "model.")


# --------------------------------------------------------------------------- dump / load

def custom_config() -> Root:
    return load_config(Root, overrides=[
        "name=yes", "seed=3", "model.path=1e3", "model.dtype=float32", "objective.alpha=4.5",
        "objective.temperature=1e-5", "objective.false_negative_threshold=0.9",
        "data.subsets=[A, 'null', '', '1e3', 'on']", "data.shuffle=false", "data.image_root=", "eval.alpha=0",
    ])


@pytest.mark.parametrize("make", [Root, custom_config])
def test_dump_load_round_trip(tmp_path, make):
    cfg = make()
    path = dump_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(Root, path) == cfg
    assert config_from_dict(Root, config_to_dict(cfg)) == cfg


def test_dump_keeps_field_order_and_plain_types(tmp_path):
    cfg = custom_config()
    d = config_to_dict(cfg)
    assert list(d) == ["name", "seed", "model", "objective", "data", "eval"]
    assert list(d["objective"]) == ["temperature", "alpha", "false_negative_threshold"]
    text = dump_config(cfg, tmp_path / "c.yaml").read_text()
    assert text.index("name:") < text.index("seed:") < text.index("model:")
    assert yaml.safe_load(text)["model"]["path"] == "1e3"  # quoted: plain YAML readers agree


# --------------------------------------------------------------------------- the project's configs

def test_choices_agree_with_the_code_that_uses_them():
    from llave_ds.core.gather import GatherMode
    from llave_ds.core.objective import ObjectiveConfig
    from llave_ds.export import model_dir as export
    from llave_ds.model import embedding as model
    from llave_ds.model.backbones import SUPPORTED_BACKBONES
    from llave_ds.model.dtypes import DTYPES

    def choices(cls, name):
        return set(typing.get_args(typing.get_type_hints(cls)[name]))

    assert choices(ObjectiveConfig, "gather_mode") == {m.value for m in GatherMode}
    assert choices(model.ModelConfig, "dtype") == set(DTYPES)
    assert choices(model.ModelConfig, "backbone") == {"auto", *SUPPORTED_BACKBONES}
    assert choices(export.ExportConfig, "dtype") <= set(DTYPES)


def test_shipped_configs_load_and_round_trip(tmp_path):
    from llave_ds.config import shipped_file
    from llave_ds.train import TrainConfig

    for name in ["demo_cpu", "llave_0.5b", "llave_2b", "llave_7b", "qwen2vl_2b", "qwen2_5vl_3b", "qwen3vl_2b", "qwen3vl_8b"]:
        cfg = load_config(TrainConfig, shipped_file("train", name), ["data.source=/data/mmeb"])
        assert load_config(TrainConfig, dump_config(cfg, tmp_path / f"{name}.yaml")) == cfg, name
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides=["data.source=/d", "schedule.kind=cosin"])
    assert "Did you mean 'cosine'?" in str(info.value)
