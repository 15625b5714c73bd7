"""The experiment configs: every variant loads as `--config=` loads it, the launch commands in
their docstrings parse, unknown variants name the nearest, and the model presets build the
official Qwen3 shapes."""

import re
import shlex
from pathlib import Path

import jax
import pytest

from cacherl_jax import cli, config_flags, parallel
from cacherl_jax.model import Qwen3Config, abstract_params, param_shapes, presets
from cacherl_jax.pipeline_demo import apply_overrides
from configs import augment, grpo, rft, sft
from configs import model as model_configs

CONFIGS = Path(model_configs.__file__).parent
MODULES = {"sft": sft, "grpo": grpo, "rft": rft, "augment": augment, "model": model_configs}
# Non-embedding parameter counts from the Qwen3 model cards (0.44B, 1.4B, 3.6B).
NON_EMBEDDING = {"qwen3_0.6b": 0.44e9, "qwen3_1.7b": 1.4e9, "qwen3_4b": 3.6e9}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_variant_loads_as_the_command_line_loads_it(name):
    module = MODULES[name]
    default = config_flags.load_config(str(CONFIGS / f"{name}.py"))
    for variant in module.VARIANTS:
        loaded = config_flags.load_config(f"{CONFIGS / name}.py:{variant}")
        assert loaded.to_dict() == module.get_config(variant).to_dict()
    assert default.to_dict() == module.get_config(module.VARIANTS[0]).to_dict()


def _launch_commands(docstring: str) -> list[list[str]]:
    """The `cacherl ...` commands of a docstring, continuation lines joined."""
    text = docstring.replace("\\\n", " ")
    return [shlex.split(line) for line in re.findall(r"^\s*(cacherl \S+ --config=.*)$", text, re.M)]


@pytest.mark.parametrize("name", ["sft", "grpo", "rft", "augment"])
def test_the_launch_commands_in_a_docstring_parse(name, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    commands = _launch_commands(MODULES[name].__doc__)
    assert commands, f"configs/{name}.py's docstring shows no launch command"
    for _, command, *argv in commands:
        assert command == name
        flags = cli._config_flags(command)
        parsed = config_flags.parse(command, argv, flags, summary="", example="")
        assert parsed.config.variant in MODULES[name].VARIANTS


UNKNOWN_VARIANTS = [
    ("sft", "tyni", "tiny"),
    ("grpo", "qwen3_4B", "qwen3_4b"),
    ("rft", "qwen3_1.7", "qwen3_1.7b"),
    ("augment", "endpiont", "endpoint"),
    ("model", "bench29m", "bench_29m"),
]


@pytest.mark.parametrize(("name", "typo", "nearest"), UNKNOWN_VARIANTS)
def test_an_unknown_variant_names_the_nearest(name, typo, nearest):
    with pytest.raises(
        ValueError, match=rf"unknown {name} variant '{typo}'; did you mean '{nearest}'"
    ):
        MODULES[name].get_config(typo)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_build_valid_configs(name):
    config = model_configs.get_config(name)
    qwen3 = Qwen3Config(**config.model)
    assert (
        set(jax.tree.leaves(param_shapes(qwen3)))
        and abstract_params(qwen3)["embed"].shape[0] == qwen3.vocab_size
    )
    assert dict(parallel.make_mesh(config.mesh).shape)["fsdp"] == jax.device_count()


@pytest.mark.parametrize("name", sorted(NON_EMBEDDING))
def test_official_shapes_have_the_published_sizes(name):
    qwen3 = Qwen3Config(**model_configs.get_config(name).model)
    shapes = param_shapes(qwen3)
    non_embedding = sum(x.size for x in jax.tree.leaves(shapes)) - shapes["embed"].size
    assert abs(non_embedding - NON_EMBEDDING[name]) / NON_EMBEDDING[name] < 0.03


def test_every_reproduction_variant_sets_existing_grpo_fields():
    """Each variant of experiments/reproduce_paper.py, the ones the suite's quick run leaves out
    too, sets GRPO config fields that exist, with their types (a typo would be a KeyError only
    when that variant first runs, hours into a reproduction)."""
    from experiments import reproduce_paper

    plan = reproduce_paper.Plan(
        "default", dict(reproduce_paper.PRESETS["default"]), (0,), 0.04, "template", Path(".")
    )
    for variant in reproduce_paper.VARIANTS:
        overrides = plan.grpo_overrides(variant)
        config = apply_overrides(grpo.get_config("tiny"), overrides, name=variant.name)
        for dotted, value in variant.grpo.items():
            section, field = dotted.split(".")
            assert config[section][field] == value, variant.name
    names = {v.name: v for v in reproduce_paper.VARIANTS}
    assert names["trusted_reward"].grpo == {"reward.tier_rule": "trusted"}
    assert names["answer_rejections"].grpo == {"loop.answer_rejections": True}
    defaults = reproduce_paper.parse_args([]).variants
    assert "full" in defaults and not set(reproduce_paper.NOT_DEFAULT) & set(defaults)


def test_reproduction_grpo_fields_reach_every_variant_and_the_variants_own_win():
    """`reproduce_paper.py --grpo FIELD=VALUE` sets the field in every variant's GRPO config (and so
    in the settings a rerun compares), under the variant's own fields; a typo is refused at once."""
    from experiments import reproduce_paper

    args = reproduce_paper.parse_args(["--grpo", "loop.temperature=0.6", "--grpo", "loop.mode=x"])
    assert args.grpo == [("loop.temperature", 0.6), ("loop.mode", "x")]
    plan = reproduce_paper.Plan(
        "default", dict(reproduce_paper.PRESETS["default"]), (0,), 0.04, "template", Path("."),
        grpo_fields=dict(args.grpo),
    )  # fmt: skip
    modes = {}
    for variant in reproduce_paper.VARIANTS:
        config = apply_overrides(grpo.get_config("tiny"), plan.grpo_overrides(variant))
        assert config.loop.temperature == 0.6, variant.name
        assert plan.settings(variant)["grpo_overrides"]["loop.temperature"] == 0.6
        modes[variant.name] = config.loop.mode
    assert modes["live_tools"] == "live" and modes["full"] == "x"
    assert "loop.temperature=0.6" in reproduce_paper.grpo_fields_note(plan)
    for bad in ("loop.temperature", "loop.temprature=0.6", "loop.temperature=hot"):
        with pytest.raises(SystemExit):
            reproduce_paper.parse_args(["--grpo", bad])
