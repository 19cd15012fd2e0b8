"""The config system: dataclass defaults < defaults mapping < YAML file < overrides."""
from __future__ import annotations  # annotations must resolve through get_type_hints

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from llave_ds.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_keys,
    config_to_dict,
    describe_config,
    dump_config,
    load_config,
    parse_cli,
)

VALIDATE_CALLS: list[str] = []


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass
class ModelSection:
    path: str = ""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    kwargs: dict[str, Any] = field(default_factory=dict)


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
    subsets: list[str] | None = None
    shuffle: bool = True
    batch_size: int = 8
    image_size: tuple[int, ...] = (336, 336)
    crop: tuple[int, int] = (0, 0)
    root: Path = Path("/data")

    def validate(self) -> None:
        VALIDATE_CALLS.append("data")


@dataclass
class GradCacheSection:
    query_chunk_size: Optional[int] = None
    mode: Mode = Mode.FAST


@dataclass
class Root:
    name: str = "run"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    data: DataSection = field(default_factory=DataSection)
    gradcache: GradCacheSection = field(default_factory=GradCacheSection)
    eval: Optional[ObjectiveSection] = None
    extra: Any = None

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


def err(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(Root, *args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- layering

def test_defaults_only():
    cfg = load_config(Root)
    assert cfg == Root()
    assert cfg.model.dtype == "bfloat16" and cfg.data.image_size == (336, 336)
    assert cfg.eval is None
    # each load gets fresh mutable defaults
    cfg.model.kwargs["x"] = 1
    assert load_config(Root).model.kwargs == {}


def test_yaml_then_overrides_precedence(tmp_path):
    p = write(tmp_path, """
model:
  path: /from/yaml
  dtype: float32
objective:
  alpha: 2
  temperature: 0.1
data.batch_size: 4
""")
    cfg = load_config(Root, p, ["objective.alpha=4.5", "model.path=/from/cli"],
                      defaults={"objective": {"temperature": 0.2, "false_negative_threshold": 0.9},
                                "seed": 7})
    assert cfg.model.path == "/from/cli"            # override beats YAML
    assert cfg.model.dtype == "float32"             # YAML beats dataclass default
    assert cfg.objective.alpha == 4.5
    assert cfg.objective.temperature == 0.1         # YAML beats defaults mapping
    assert cfg.objective.false_negative_threshold == 0.9  # defaults mapping beats dataclass
    assert cfg.seed == 7
    assert cfg.data.batch_size == 4                 # dotted key inside YAML
    assert cfg.data.shuffle is True                 # untouched keys keep defaults
    # later overrides win over earlier ones
    assert load_config(Root, p, ["seed=1", "seed=2"]).seed == 2


def test_yaml_values_are_coerced(tmp_path):
    p = write(tmp_path, """
objective: {alpha: 3, temperature: 1e-2}
data: {subsets: [A, B], image_size: [224, 224], batch_size: 16.0}
gradcache:
""")
    cfg = load_config(Root, p)
    assert type(cfg.objective.alpha) is float and cfg.objective.alpha == 3.0
    assert cfg.objective.temperature == 0.01
    assert cfg.data.subsets == ["A", "B"]
    assert cfg.data.image_size == (224, 224)
    assert type(cfg.data.batch_size) is int and cfg.data.batch_size == 16
    assert cfg.gradcache == GradCacheSection()  # an empty section block changes nothing


def test_empty_yaml_file_is_no_settings(tmp_path):
    assert load_config(Root, write(tmp_path, "# nothing\n")) == Root()


@pytest.mark.parametrize("override,get,expected", [
    ("objective.alpha=4", lambda c: c.objective.alpha, 4.0),
    ("objective.alpha=4.5", lambda c: c.objective.alpha, 4.5),
    ("objective.temperature=1e-3", lambda c: c.objective.temperature, 0.001),
    ("objective.false_negative_threshold=null", lambda c: c.objective.false_negative_threshold, None),
    ("objective.false_negative_threshold=0.9", lambda c: c.objective.false_negative_threshold, 0.9),
    ("data.batch_size=16", lambda c: c.data.batch_size, 16),
    ("data.batch_size=16.0", lambda c: c.data.batch_size, 16),
    ("data.shuffle=false", lambda c: c.data.shuffle, False),
    ("data.shuffle=yes", lambda c: c.data.shuffle, True),
    ("data.subsets=[A,B]", lambda c: c.data.subsets, ["A", "B"]),
    ("data.subsets=A,B", lambda c: c.data.subsets, ["A", "B"]),
    ("data.subsets=A, B ,C", lambda c: c.data.subsets, ["A", "B", "C"]),
    ("data.subsets=A", lambda c: c.data.subsets, ["A"]),
    ("data.subsets=", lambda c: c.data.subsets, []),
    ("data.subsets=null", lambda c: c.data.subsets, None),
    ("data.image_size=[224,224]", lambda c: c.data.image_size, (224, 224)),
    ("data.image_size=224,112", lambda c: c.data.image_size, (224, 112)),
    ("data.crop=[1,2]", lambda c: c.data.crop, (1, 2)),
    ("data.root=/tmp/x", lambda c: c.data.root, Path("/tmp/x")),
    ("gradcache.query_chunk_size=16", lambda c: c.gradcache.query_chunk_size, 16),
    ("gradcache.mode=slow", lambda c: c.gradcache.mode, Mode.SLOW),
    ("model.path=/x", lambda c: c.model.path, "/x"),
    ("model.path=", lambda c: c.model.path, ""),
    ("model.path=/a=b", lambda c: c.model.path, "/a=b"),
    ("model.dtype=float32", lambda c: c.model.dtype, "float32"),
    ("model.kwargs={attn: sdpa, n: 2}", lambda c: c.model.kwargs, {"attn": "sdpa", "n": 2}),
    ("model.kwargs.attn.impl=flash", lambda c: c.model.kwargs, {"attn": {"impl": "flash"}}),
    ("name=123", lambda c: c.name, "123"),          # str fields take the text literally
    ("name=yes", lambda c: c.name, "yes"),
    ("name=a: {b", lambda c: c.name, "a: {b"),      # even when it is not valid YAML
    ("extra={a: [1, 2]}", lambda c: c.extra, {"a": [1, 2]}),
    ("extra=3", lambda c: c.extra, 3),
    ("eval.alpha=2", lambda c: c.eval, ObjectiveSection(alpha=2.0)),
    ("eval={temperature: 0.5}", lambda c: c.eval, ObjectiveSection(temperature=0.5)),
    ("objective={alpha: 1, temperature: 0.3}", lambda c: c.objective,
     ObjectiveSection(alpha=1.0, temperature=0.3)),
])
def test_override_coercion(override, get, expected):
    value = get(load_config(Root, overrides=[override]))
    assert value == expected
    assert type(value) is type(expected)


def test_optional_section_can_be_reset_to_null():
    cfg = load_config(Root, overrides=["eval.alpha=2", "eval=null"])
    assert cfg.eval is None


# --------------------------------------------------------------------------- errors

def test_unknown_override_key_suggests_and_lists_valid_keys():
    msg = err(overrides=["objective.alpah=3"])
    assert "'objective.alpah'" in msg
    assert "Did you mean 'objective.alpha'?" in msg
    assert "temperature, alpha, false_negative_threshold" in msg
    assert "override 'objective.alpah=3'" in msg


def test_unknown_key_at_wrong_level_points_to_section():
    msg = err(overrides=["temperature=0.1"])
    assert "Did you mean 'objective.temperature'?" in msg
    assert "top level" in msg and "model, objective, data" in msg


def test_unknown_yaml_key_names_file(tmp_path):
    p = write(tmp_path, "data:\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(Root, p)
    msg = str(info.value)
    assert "'data.batchsize'" in msg and str(p) in msg
    assert "Did you mean 'data.batch_size'?" in msg
    assert info.value.key == "data.batchsize" and info.value.source == str(p)


def test_wrong_type_from_override_names_key_type_value_source():
    msg = err(overrides=["data.batch_size=abc"])
    assert "'data.batch_size'" in msg
    assert "expected int" in msg
    assert "'abc' (str)" in msg
    assert "override 'data.batch_size=abc'" in msg


def test_wrong_type_from_yaml_names_file(tmp_path):
    p = write(tmp_path, "objective:\n  alpha: high\n")
    msg = err(p)
    assert "'objective.alpha'" in msg and "expected float" in msg
    assert "'high' (str)" in msg and str(p) in msg


@pytest.mark.parametrize("override,needle", [
    ("data.batch_size=2.5", "expected int"),                  # non-integral float for int
    ("data.batch_size=true", "expected int"),                 # bool is not an int
    ("objective.alpha=true", "expected float"),
    ("objective.false_negative_threshold=abc", "expected Optional[float]"),
    ("data.subsets=[A, [B]]", "'data.subsets[1]'"),
    ("data.image_size=[1, x]", "'data.image_size[1]'"),
    ("data.crop=[1,2,3]", "exactly 2 items"),
    ("gradcache.query_chunk_size=1.5", "expected Optional[int]"),
    ("gradcache.mode=medium", "expected Mode"),
    ("model.path=null", "expected str"),
    ("model=3", "a section takes a mapping"),
    ("objective=null", "a section takes a mapping"),
    ("objective.alpha.x=1", "not a section"),
    ("data.subsets=[A", "cannot read"),
])
def test_override_type_errors(override, needle):
    msg = err(overrides=[override])
    assert needle in msg
    assert f"override '{override}'" in msg


def test_string_in_yaml_for_int_is_rejected(tmp_path):
    msg = err(write(tmp_path, "data:\n  batch_size: '8'\n"))
    assert "'data.batch_size'" in msg and "expected int" in msg and "'8' (str)" in msg


def test_number_in_yaml_for_str_is_rejected(tmp_path):
    msg = err(write(tmp_path, "name: 1234\n"))
    assert "'name'" in msg and "expected str" in msg and "1234 (int)" in msg


def test_bad_literal():
    msg = err(overrides=["model.dtype=bfloat"])
    assert "'model.dtype'" in msg
    assert "Literal['float32', 'bfloat16']" in msg
    assert "'bfloat' (str)" in msg
    assert "Did you mean 'bfloat16'?" in msg
    assert "override 'model.dtype=bfloat'" in msg
    with pytest.raises(ConfigError, match="expected Literal"):
        config_from_dict(Root, {"model": {"dtype": 32}})


@pytest.mark.parametrize("value", [3, 1, 0, "maybe", 1.0])
def test_bool_rejects_non_booleans(value):
    with pytest.raises(ConfigError) as info:
        config_from_dict(Root, {"data": {"shuffle": value}}, source="test-dict")
    msg = str(info.value)
    assert "'data.shuffle'" in msg and "expected bool" in msg and "test-dict" in msg
    assert repr(value) in msg


@pytest.mark.parametrize("word,expected", [("yes", True), ("No", False), ("on", True),
                                           ("false", False), (True, True)])
def test_bool_accepts_yaml_words(word, expected):
    assert config_from_dict(Root, {"data": {"shuffle": word}}).data.shuffle is expected


def test_override_without_equals():
    with pytest.raises(ConfigError) as info:
        load_config(Root, overrides=["objective.alpha"])
    assert "'objective.alpha'" in str(info.value) and "'='" in str(info.value)


@pytest.mark.parametrize("bad", ["=3", ".a=3", "objective..alpha=3"])
def test_override_with_malformed_key(bad):
    assert f"'{bad}'" in err(overrides=[bad])


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    msg = err(p)
    assert "not found" in msg and str(p) in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "a: [1\n", "a: 1\na: 2\n"])
def test_bad_yaml_file_names_file(tmp_path, text):
    p = write(tmp_path, text)
    assert str(p) in err(p)


def test_duplicate_yaml_key_is_reported(tmp_path):
    assert "duplicate key 'objective'" in err(write(tmp_path, "objective: {}\nobjective: {}\n"))


def test_missing_required_key():
    with pytest.raises(ConfigError) as info:
        load_config(Required)
    assert "Missing required key 'out_dir'" in str(info.value)
    assert load_config(Required, overrides=["out_dir=/o"]).out_dir == "/o"


# --------------------------------------------------------------------------- validate()

def test_validate_called_children_first_then_root():
    VALIDATE_CALLS.clear()
    load_config(Root, overrides=["eval.alpha=1"])
    assert VALIDATE_CALLS[-1] == "root"
    assert sorted(VALIDATE_CALLS[:-1]) == ["data", "objective", "objective"]  # eval too


def test_validate_error_is_prefixed_with_section_path():
    with pytest.raises(ConfigError) as info:
        load_config(Root, overrides=["objective.temperature=0"])
    assert str(info.value) == "objective: objective.temperature must be > 0"
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError) as info:
        load_config(Root, overrides=["eval.temperature=-1"])
    assert str(info.value) == "eval: objective.temperature must be > 0"
    with pytest.raises(ConfigError) as info:
        load_config(Root, overrides=["seed=-1"])
    assert str(info.value) == "seed must be >= 0"


# --------------------------------------------------------------------------- dump / load

def custom_config() -> Root:
    return load_config(Root, overrides=[
        "name=yes", "seed=3", "model.path=1e3", "model.dtype=float32",
        "model.kwargs={attn: sdpa, layers: [1, 2]}", "objective.alpha=4.5",
        "objective.temperature=1e-5", "objective.false_negative_threshold=0.9",
        "data.subsets=[A, 'null', '']", "data.shuffle=false", "data.image_size=[1,2,3]",
        "data.root=/data/x", "gradcache.mode=slow", "eval.alpha=0", "extra={k: v}",
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
    assert list(d) == ["name", "seed", "model", "objective", "data", "gradcache", "eval", "extra"]
    assert list(d["objective"]) == ["temperature", "alpha", "false_negative_threshold"]
    assert d["data"]["image_size"] == [1, 2, 3] and d["data"]["root"] == "/data/x"
    assert d["gradcache"]["mode"] == "slow"
    text = dump_config(cfg, tmp_path / "c.yaml").read_text()
    assert text.index("name:") < text.index("seed:") < text.index("model:")
    assert yaml.safe_load(text)["data"]["image_size"] == [1, 2, 3]


def test_apply_overrides_returns_new_config():
    base = custom_config()
    new = apply_overrides(base, ["objective.alpha=1", "data.subsets=C"])
    assert new.objective.alpha == 1.0 and new.data.subsets == ["C"]
    assert base.objective.alpha == 4.5 and base.data.subsets == ["A", "null", ""]
    assert new.model == base.model and new.model is not base.model
    with pytest.raises(ConfigError, match="objective: objective.temperature must be > 0"):
        apply_overrides(base, ["objective.temperature=0"])


# --------------------------------------------------------------------------- CLI

def test_parse_cli(tmp_path):
    p = write(tmp_path, "objective:\n  alpha: 2\nmodel:\n  path: /y\n")
    cfg = parse_cli(["--config", str(p), "objective.alpha=3", "data.subsets=A,B"], Root)
    assert cfg.objective.alpha == 3.0 and cfg.model.path == "/y" and cfg.data.subsets == ["A", "B"]
    assert parse_cli([f"--config={p}"], Root).objective.alpha == 2.0
    assert parse_cli(["seed=5"], Root).seed == 5
    assert parse_cli([], Root) == Root()


@pytest.mark.parametrize("argv,needle", [
    (["--config"], "--config needs a file path"),
    (["--config", "a.yaml", "--config", "b.yaml"], "--config given twice"),
    (["--lr", "3"], "Unknown option '--lr'"),
    (["seed"], "missing '='"),
    (["--config", "/no/such/file.yaml"], "/no/such/file.yaml"),
])
def test_parse_cli_errors(argv, needle):
    with pytest.raises(ConfigError) as info:
        parse_cli(argv, Root)
    assert needle in str(info.value)


def test_describe_config_lists_every_key():
    text = describe_config(Root)
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines] == config_keys(Root)
    assert len(lines) == len(set(config_keys(Root)))
    by_key = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in lines}
    assert by_key["objective.temperature"] == "float = 0.05"
    assert by_key["model.dtype"] == "Literal['float32', 'bfloat16'] = bfloat16"
    assert by_key["data.subsets"] == "Optional[list[str]] = null"
    assert by_key["data.image_size"] == "tuple[int, ...] = [336, 336]"
    assert by_key["eval"] == "Optional[ObjectiveSection] = null"
    assert by_key["eval.alpha"] == "float = 9.0"
    assert "model" not in by_key  # plain sections are not keys themselves
    assert describe_config(Required).splitlines()[0].endswith("str = <required>")
