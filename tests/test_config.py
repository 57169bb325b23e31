"""Config loader: bad configs give errors naming file, key and expectation; good ones resolve."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline import config
from pipeline.config import ConfigError, RunSpec, dump_config
from pipeline.config.load import to_dataclass
from pipeline.config.schema import DataSpec
from pipeline.distill.base import METHODS, Method
from pipeline.distill.requirements import Requirements
from pipeline.models import MODELS
from pipeline.registry import Registry

TEACHER_METHOD = "cfgtest_distil"  # throwaway methods, registered under names no real one uses
PLAIN_METHOD = "cfgtest_plain"


@dataclass
class _Options:
    temperature: float = 4.0
    alpha: float = 0.9
    mode: Literal["soft", "hard"] = "soft"
    layers: list[int] = field(default_factory=lambda: [1, 2])
    scales: tuple[float, ...] = (1.0,)


class _TeacherMethod(Method):
    Options = _Options
    needs = Requirements(needs_teacher=True)


class _PlainMethod(Method):
    Options = _Options
    needs = Requirements(needs_teacher=False)


# The loader validates against the registry its caller injects: here the real methods plus two
# throwaway ones that exist only in this registry.
TEST_METHODS: Registry[type[Method]] = Registry("method")
for _name in METHODS:
    TEST_METHODS.register(_name)(METHODS.get(_name))
for _name, _cls in ((TEACHER_METHOD, _TeacherMethod), (PLAIN_METHOD, _PlainMethod)):
    TEST_METHODS.register(_name)(_cls)
load_config = functools.partial(config.load_config, methods=TEST_METHODS)

# A complete small run that passes every check (the data root is created by the fixture).
GOOD = f"""
name: good
data: {{dataset: demo, root: data, batch_size: 16}}
teacher: {{arch: resnet32x4}}
method: {{name: {TEACHER_METHOD}, temperature: 2}}
optim: {{epochs: 10, milestones: [5, 8]}}
"""


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder holding ``data/`` (relative config paths resolve against it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    return tmp_path


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path, overrides: list[str] | None = None, **kwargs: bool) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [], **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------- bad configs


def test_unknown_top_level_key(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD + "optimizer: {lr: 0.1}\n")
    assert error_of(cfg) == "a.yaml: unknown key 'optimizer'; did you mean 'optim'?"


def test_unknown_key_without_close_match_lists_valid_keys(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD + "zzz: 1\n")
    msg = error_of(cfg)
    assert msg.startswith("a.yaml: unknown key 'zzz' (valid keys: name, seed, run_dir, data")


def test_unknown_nested_key_suggests_nearest(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD + "train: {mixed_precison: bf16}\n")
    msg = error_of(cfg)
    assert msg == (
        "a.yaml: unknown key 'train.mixed_precison'; did you mean 'train.mixed_precision'?"
    )


def test_wrong_type_str_for_int(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD + "seed: abc\n")
    assert error_of(cfg) == "a.yaml: seed: expected int, found str ('abc')"


def test_number_for_str_is_an_error(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD.replace("name: good", "name: 42"))
    assert error_of(cfg) == "a.yaml: name: expected str, found int (42)"


def test_bool_is_not_an_int(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD.replace("batch_size: 16", "batch_size: true"))
    assert error_of(cfg) == "a.yaml: data.batch_size: expected int, found bool (True)"


def test_mapping_for_scalar_and_scalar_for_mapping(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD + "seed: {a: 1}\n")
    assert error_of(cfg) == "a.yaml: seed: expected int, found mapping ({'a': 1})"
    cfg = write(cwd, "b.yaml", GOOD + "train: 3\n")
    assert error_of(cfg) == "b.yaml: train: expected a mapping (TrainSpec), found int (3)"


def test_bad_literal_lists_choices(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD + "train: {mixed_precision: fp8}\n")
    assert error_of(cfg) == (
        "a.yaml: train.mixed_precision: expected one of 'no', 'fp16', 'bf16', found str ('fp8')"
    )


def test_yaml_boolean_for_literal_hints_quoting(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD + "train: {mixed_precision: no}\n")
    msg = error_of(cfg)
    assert "train.mixed_precision: expected one of 'no'" in msg and "found bool (False)" in msg
    assert "quote the value" in msg


def test_bad_list_element_names_position(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD.replace("[5, 8]", "[5, 8, x]"))
    assert error_of(cfg) == "a.yaml: optim.milestones[2]: expected int, found str ('x')"


def test_missing_base_file(cwd: Path) -> None:
    cfg = write(cwd, "exp/a.yaml", "base: ../_base/missing.yaml\n" + GOOD)
    msg = error_of(cfg)
    assert msg.startswith("exp/a.yaml: base file not found: ")
    assert str(cwd.resolve() / "_base" / "missing.yaml") in msg


def test_base_cycle_names_the_chain(cwd: Path) -> None:
    write(cwd, "b.yaml", "base: c.yaml\n")
    write(cwd, "c.yaml", "base: b.yaml\n")
    cfg = write(cwd, "a.yaml", "base: b.yaml\n")
    assert "cycle: a.yaml -> b.yaml -> c.yaml -> b.yaml" in error_of(cfg)


def test_diamond_bases_are_not_a_cycle_and_errors_name_the_setting_file(cwd: Path) -> None:
    write(cwd, "d.yaml", "data: {batch_size: x}\n")
    write(cwd, "b.yaml", "base: d.yaml\nseed: 1\n")
    write(cwd, "c.yaml", "base: d.yaml\nseed: 2\n")
    cfg = write(cwd, "a.yaml", "base: [b.yaml, c.yaml]\n" + GOOD.replace("batch_size: 16", ""))
    assert error_of(cfg) == "d.yaml: data.batch_size: expected int, found str ('x')"
    fixed = write(cwd, "e.yaml", "base: [b.yaml, c.yaml]\n" + GOOD)
    spec = load_config(fixed)
    assert (spec.seed, spec.data.batch_size) == (2, 16)


def test_missing_data_root(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD.replace("root: data", "root: nowhere/imagenet"))
    msg = error_of(cfg)
    assert msg.startswith("a.yaml: data.root: directory not found: ")
    assert str(cwd.resolve() / "nowhere" / "imagenet") in msg
    assert load_config(cfg, check_paths=False).data.root == "nowhere/imagenet"


def test_synthetic_data_needs_no_root(cwd: Path) -> None:
    text = GOOD.replace("dataset: demo, root: data", "dataset: synthetic, root: nowhere")
    assert load_config(write(cwd, "a.yaml", text)).data.dataset == "synthetic"


def test_missing_weights_file(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD.replace("{arch: resnet32x4}", "{arch: r, weights: t.pt}"))
    msg = error_of(cfg)
    assert msg.startswith("a.yaml: teacher.weights: file not found: ")
    assert str(cwd.resolve() / "t.pt") in msg
    (cwd / "t.pt").write_bytes(b"")
    assert load_config(cfg).teacher.weights == "t.pt"
    cfg = write(cwd, "b.yaml", GOOD + "model: {weights: 'torchvision:IMAGENET1K_V1'}\n")
    assert load_config(cfg).model.weights == "torchvision:IMAGENET1K_V1"


def test_unknown_method_name_suggests_nearest(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD.replace(f"name: {TEACHER_METHOD}", "name: cfgtest_distl"))
    msg = error_of(cfg)
    assert msg.startswith(
        f"a.yaml: method.name: unknown method 'cfgtest_distl'; did you mean '{TEACHER_METHOD}'?"
    )


def test_unknown_method_option(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD.replace("temperature: 2", "temprature: 2"))
    assert error_of(cfg) == (
        "a.yaml: unknown key 'method.temprature'; did you mean 'method.temperature'?"
    )


def test_method_option_type_error_names_the_base_file_that_set_it(cwd: Path) -> None:
    write(cwd, "_base/b.yaml", f"method: {{name: {TEACHER_METHOD}, mode: medium}}\n")
    cfg = write(cwd, "exp/a.yaml", "base: ../_base/b.yaml\n" + GOOD.replace("method:", "#"))
    msg = error_of(cfg)
    assert msg.startswith("_base/b.yaml: method.mode: expected one of 'soft', 'hard'")


def test_override_with_unknown_key(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD)
    msg = error_of(cfg, ["data.batchsize=32"])
    assert msg == "--set: unknown key 'data.batchsize'; did you mean 'data.batch_size'?"


def test_override_with_uncoercible_value(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD)
    assert error_of(cfg, ["data.batch_size=abc"]) == (
        "--set: data.batch_size: expected int, found str ('abc')"
    )
    assert "optim.milestones: cannot read" in error_of(cfg, ["optim.milestones=[30,60"])
    assert "expected dotted.key=value" in error_of(cfg, ["data.batch_size"])


def test_yaml_syntax_error_names_file_and_line(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", "name: x\ndata:\n  root: [data\nseed: 1\n")
    msg = error_of(cfg)
    assert msg.startswith("a.yaml: line ") and "invalid YAML" in msg


def test_duplicate_key_is_an_error(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD + "seed: 1\nseed: 2\n")
    assert "a.yaml: line 8: duplicate key 'seed' (first set at line 7)" in error_of(cfg)


def test_teacher_missing_for_a_teacher_method(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD.replace("teacher: {arch: resnet32x4}", ""))
    assert error_of(cfg) == f"a.yaml: method '{TEACHER_METHOD}' needs a teacher: set teacher.arch"
    text = GOOD.replace(TEACHER_METHOD, PLAIN_METHOD).replace("{arch: resnet32x4}", "null")
    cfg = write(cwd, "b.yaml", text)
    assert load_config(cfg).teacher is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.eval_splits=[]", "--set: data.eval_splits: expected at least one split, found []"),
        ("data.batch_size=0", "--set: data.batch_size: expected a value >= 1, found 0"),
        ("optim.epochs=0", "--set: optim.epochs: expected a value >= 1, found 0"),
        ("optim.milestones=[8,5]", "--set: optim.milestones: expected increasing epochs"),
        ("data.std=[0.2,0.2]", "--set: data.std: expected 3 values (one per RGB channel)"),
        ("teacher.source=cached", "--set: teacher.source: 'cached' needs data.views = the K"),
    ],
)
def test_cross_field_checks(cwd: Path, override: str, expected: str) -> None:
    cfg = write(cwd, "a.yaml", GOOD)
    message = error_of(cfg, [override])
    assert message.startswith(expected)


def test_missing_config_file(cwd: Path) -> None:
    assert error_of(cwd / "nope.yaml").startswith("config file not found: ")


# ------------------------------------------------------------------------------- good configs


def test_base_inheritance_from_subfolder_deep_merge_and_list_replacement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    write(repo, "configs/_base/data.yaml", "data: {root: /, batch_size: 8, mean: [0, 0, 0]}\n")
    write(
        repo,
        "configs/_base/run.yaml",
        f"""
        base: data.yaml
        seed: 3
        data: {{eval_splits: [val, test], workers: 4}}
        method: {{name: {PLAIN_METHOD}, alpha: 0.5, layers: [1, 2, 3]}}
        tracking: {{tags: {{team: a}}}}
        """,
    )
    write(
        repo,
        "configs/exp/child.yaml",
        """
        base: [../_base/run.yaml]
        data: {batch_size: 32, eval_splits: [val]}
        method: {layers: [4]}
        tracking: {tags: {who: b}}
        """,
    )
    monkeypatch.chdir(tmp_path)  # base paths are relative to the file, not the cwd
    spec = load_config("repo/configs/exp/child.yaml")
    assert spec.seed == 3
    assert (spec.data.root, spec.data.batch_size, spec.data.workers) == ("/", 32, 4)
    assert spec.data.mean == [0.0, 0.0, 0.0] and spec.data.std == DataSpec().std
    assert spec.data.eval_splits == ["val"]  # lists are replaced, not merged
    assert spec.tracking.tags == {"team": "a", "who": "b"}  # mappings merge
    assert spec.method == {
        "name": PLAIN_METHOD,
        "temperature": 4.0,
        "alpha": 0.5,
        "mode": "soft",
        "layers": [4],
        "scales": [1.0],
    }
    assert spec.method_options == _Options(alpha=0.5, layers=[4])


def test_switching_method_drops_the_inherited_options(cwd: Path) -> None:
    write(cwd, "b.yaml", f"method: {{name: {PLAIN_METHOD}, mode: hard, alpha: 0.1}}\n")
    cfg = write(cwd, "a.yaml", "base: b.yaml\n" + GOOD)
    assert load_config(cfg).method_options == _Options(temperature=2.0)
    same = write(cwd, "c.yaml", f"base: b.yaml\nmethod: {{name: {PLAIN_METHOD}, alpha: 0.2}}\n")
    spec = load_config(
        same,
        [f"method.name={TEACHER_METHOD}", "method.layers=[]", "teacher.arch=r"],
        check_paths=False,
    )
    assert spec.method_options == _Options(layers=[])  # --set switching the method, too
    spec = load_config(same, ["teacher.arch=r"], check_paths=False)
    assert spec.method_options == _Options(mode="hard", alpha=0.2)


def test_overrides_coerce_to_schema_types(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD + "model: {weights: 'torchvision:X'}\n")
    spec = load_config(
        cfg,
        [
            "data.batch_size=32",
            "optim.lr=1e-3",
            "optim.gamma=1",
            "optim.nesterov=true",
            "optim.milestones=[30,60]",
            "model.weights=null",
            "teacher.weights=null",
            "name=42",
            "train.mixed_precision=no",
            "model.arch=resnet18",
            "method.temperature=2.5",
            "method.mode=hard",
            "method.scales=[1, 2]",
            "tracking.tags.owner=7",
            "optim.epochs=100",
        ],
    )
    assert spec.data.batch_size == 32
    assert spec.optim.lr == 1e-3 and isinstance(spec.optim.lr, float)
    assert spec.optim.gamma == 1.0 and isinstance(spec.optim.gamma, float)
    assert spec.optim.nesterov is True
    assert spec.optim.milestones == [30, 60]
    assert spec.model.weights is None and spec.teacher.weights is None
    assert spec.name == "42" and spec.train.mixed_precision == "no"
    assert spec.model.arch == "resnet18"
    assert spec.method_options == _Options(temperature=2.5, mode="hard", scales=(1.0, 2.0))
    assert spec.tracking.tags == {"owner": "7"}


def test_override_creates_a_null_section(cwd: Path) -> None:
    text = GOOD.replace(TEACHER_METHOD, PLAIN_METHOD).replace("{arch: resnet32x4}", "null")
    spec = load_config(write(cwd, "a.yaml", text), ["teacher.arch=resnet56"])
    assert spec.teacher is not None and spec.teacher.arch == "resnet56"
    assert spec.teacher.source == "online"


def test_float_fields_accept_yaml11_exponent_strings(cwd: Path) -> None:
    text = GOOD.replace("optim: {", "optim: {lr: 1e-3, weight_decay: 5.0e-4, ")
    cfg = write(cwd, "a.yaml", text)
    spec = load_config(cfg)
    assert (spec.optim.lr, spec.optim.weight_decay) == (1e-3, 5e-4)


def test_dump_config_round_trip(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD + "tracking: {tags: {a: b}}\ntrain: {mixed_precision: 'no'}\n")
    spec = load_config(
        cfg, ["method.scales=[0.5, 1]", "teacher.source=cached", "teacher.cache_dir=c",
              "data.views=2"]
    )
    text = dump_config(spec)
    assert "method_options" not in text
    again = load_config(write(cwd, "dumped.yaml", text))
    assert again == spec
    assert again.method_options == spec.method_options
    assert dump_config(again) == text


def test_defaults_alone_are_a_valid_spec() -> None:
    assert to_dataclass(RunSpec, {}, "", "x.yaml") == RunSpec()
    with pytest.raises(ConfigError, match=r"^x\.yaml: data\.eval_splits\[1\]: expected str"):
        to_dataclass(RunSpec, {"data": {"eval_splits": ["val", 3]}}, "", "x.yaml")


def test_ffcv_random_crop_is_refused_with_a_teacher_cache(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD)
    over = ["data.backend=ffcv", "data.ffcv_random_crop=true", "teacher.source=cached",
            "teacher.cache_dir=c", "data.views=2"]
    assert error_of(cfg, over).startswith(
        "--set: data.ffcv_random_crop: expected false when teacher.source is 'cached'")
    assert load_config(cfg, over[:2]).data.ffcv_random_crop


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("cfg", "overrides", "expected"),
    [
        ("configs/demo/ipwd.yaml", ["optim.epochs=1"],
         "method.warmup_epochs: 1 leaves none of the 1 epochs with IPWD weights"),
        ("configs/demo/cid.yaml", ["optim.epochs=8", "method.warmup_epochs=8"],
         "--set: method.warmup_epochs: 8 leaves none of the 8 epochs to train"),
    ],
)
def test_warmup_leaving_no_epoch_is_a_config_error(cfg: str, overrides: list[str],
                                                   expected: str) -> None:
    """Caught when the config loads (so by --dry-run too), naming the option."""
    msg = error_of(ROOT / cfg, overrides, check_paths=False)
    assert expected in msg
    assert load_config(ROOT / cfg, [], check_paths=False).optim.epochs > 1


def test_warmup_of_a_composed_term_names_the_term(cwd: Path) -> None:
    base = ROOT / "configs/cifar100/resnet56_resnet20_kd_intervention.yaml"
    cfg = write(cwd, "a.yaml", f"base: {base}\noptim: {{epochs: 5}}\nmethod:\n  name: compose\n"
                "  terms:\n    kd: {T: 4}\n    cid.intervention: {warmup_epochs: 5}\n")
    msg = error_of(cfg, check_paths=False)
    assert msg.startswith("a.yaml: method.terms.cid.intervention.warmup_epochs: 5 leaves none")


def test_unknown_arch_names_the_key_and_nearest_networks(cwd: Path) -> None:
    cfg = write(cwd, "a.yaml", GOOD)
    message = error_of(cfg, ["model.arch=resnet2O"], models=MODELS)
    assert message.startswith("--set: model.arch: unknown network 'resnet2O'; did you mean")
    assert "timm:<name>" in message
    message = error_of(cfg, ["teacher.arch=wrn_40_3"], models=MODELS)
    assert message.startswith("--set: teacher.arch: unknown network 'wrn_40_3'; did you mean")
    assert load_config(cfg, ["model.arch=timm:resnet10t"], models=MODELS).model.arch


def test_config_stage_imports_no_later_stage(tmp_path: Path) -> None:
    """The loader runs with an injected registry and without torch or the method files."""
    cfg = write(tmp_path, "a.yaml", "name: x\ndata: {dataset: synthetic}\nmethod: {name: m}\n")
    code = f"""
import sys
from dataclasses import dataclass
from pipeline.config import load_config
from pipeline.registry import Registry

@dataclass
class Options:
    pass

class M:
    Options = Options
    @classmethod
    def parse_options(cls, raw, where, file):
        return Options()

methods = Registry("method")
methods.register("m")(M)
spec = load_config({str(cfg)!r}, methods=methods)
later = ("pipeline.distill", "pipeline.models", "pipeline.train", "pipeline.data",
         "pipeline.teacher")
late = [m for m in sys.modules if m == "torch" or m.startswith(later)]
assert spec.name == "x" and not late, late
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
