"""The command line of the config commands: `--config=FILE[:VARIANT]`, `--config.FIELD=VALUE`
overrides and a few flags of the command's own (big_vision's convention, on ml-collections).

`parse` prints the command's flags for `--help`, and turns every mistake into one
`CommandLineError` line naming the bad key and the nearest valid one: a misspelt field
(`--config.trian.steps`), flag or variant (`configs/sft.py:tyni`). ml-collections parses the
values by each field's type (`--config.model.remat=false`, `--noconfig.model.remat`, a tuple
field repeated: `--config.lora.targets=wq --config.lora.targets=wv`) and locks the config. `load_config` imports a config that lives in a package directory
(`configs/`) by its module name, so configs can share blocks (`from configs import common`).

This module sits below every layer: it imports nothing from cacherl_jax but `errors`, and no JAX.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cacherl_jax.errors import UserError

HELP_FLAGS = frozenset({"-h", "--help", "-help", "--helpfull", "--helpshort"})


class CommandLineError(UserError, ValueError):
    """A bad flag, config field or variant; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag of a command besides --config: its type is its default's (None: a string)."""

    name: str
    default: bool | int | float | str | None
    help: str
    metavar: str = "VALUE"
    required: bool = False

    def usage(self) -> str:
        if isinstance(self.default, bool):
            return f"--[no]{self.name}"
        return f"--{self.name}={self.metavar}"

    def describe(self) -> str:
        if self.required:
            return f"{self.help} (required)"
        if self.default is None or self.default == "":
            return self.help
        default = str(self.default).lower() if isinstance(self.default, bool) else self.default
        return f"{self.help} (default: {default})"


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A config command's command line, parsed."""

    config: Any  # the ml_collections.ConfigDict, overrides applied and locked
    flags: dict[str, Any]  # the command's own flags by name


def parse(
    command: str, argv: Sequence[str], flags: Sequence[Flag], *, summary: str, example: str
) -> Parsed | None:
    """Parses `cacherl COMMAND ARGV`; prints the help and returns None for `--help`.

    `example` is a config spec for the usage line (`configs/sft.py:tiny`)."""
    argv = list(argv)
    if HELP_FLAGS.intersection(_options(argv)):
        print(_help(command, flags, summary, example, _config_spec(argv)[0]))
        return None
    spec, rest = _config_spec(argv)
    if spec is None:
        raise CommandLineError(f"--config=FILE[:VARIANT] is required, e.g. --config={example}")
    config = load_config(spec)
    _check_names(rest, config, flags)
    values = _parse_with_absl(command, rest, config, flags)
    for flag in flags:
        if flag.required and values[flag.name] in (None, ""):
            raise CommandLineError(f"--{flag.name}={flag.metavar} is required")
    return Parsed(config, values)


# --- loading a config ---------------------------------------------------------------------------


def load_config(spec: str) -> Any:
    """`get_config(VARIANT)` of the config file `spec` = FILE[:VARIANT] names (`get_config()`
    without a variant), as `--config=` loads it."""
    path_text, colon, arg = spec.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise CommandLineError(f"--config={spec}: no config file {path_text}")
    module = _import_config(path.resolve())
    if not callable(getattr(module, "get_config", None)):
        raise CommandLineError(f"--config={spec}: {path_text} defines no get_config()")
    try:
        return module.get_config(arg) if colon else module.get_config()
    except ValueError as err:  # configs raise it for an unknown variant
        raise CommandLineError(f"--config={spec}: {_one_line(err)}") from None


def _import_config(path: Path) -> Any:
    """A config in a package directory is imported by name (`configs.sft`), with the package's
    parent on sys.path, so that it can import its neighbours; any other file by its path."""
    if not (path.parent / "__init__.py").is_file():
        name = f"cacherl_config_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    root = str(path.parent.parent)
    if root not in sys.path:
        sys.path.append(root)
    name = f"{path.parent.name}.{path.stem}"
    module = importlib.import_module(name)
    if Path(module.__file__).resolve() != path:
        raise CommandLineError(
            f"--config={path}: `import {name}` finds {module.__file__}, another package of that "
            f"name earlier on sys.path"
        )
    return module


# --- checking names before ml-collections parses values -----------------------------------------


def _options(argv: Sequence[str]) -> Iterator[str]:
    """The flag arguments of argv, up to a `--` that ends them."""
    for arg in argv:
        if arg == "--":
            return
        yield arg.split("=", 1)[0]


def _config_spec(argv: list[str]) -> tuple[str | None, list[str]]:
    """The last `--config=SPEC` (or `--config SPEC`) of argv, and argv without them."""
    spec, rest, args = None, [], iter(argv)
    for arg in args:
        if arg in ("--config", "-config"):
            spec = next(args, None)
        elif arg.startswith(("--config=", "-config=")):
            spec = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return spec, rest


def _check_names(argv: list[str], config: Any, flags: Sequence[Flag]) -> None:
    """Every flag of argv must be a field of `config` or one of `flags`; the first that is not
    raises with the nearest valid name. Positional arguments are refused too."""
    fields = dict(_fields(config))
    names = {flag.name: flag for flag in flags}
    args = iter(argv)
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            raise CommandLineError(f"unexpected argument {arg!r}; flags look like --name=value")
        if _takes_value(arg, fields, names) and "=" not in arg:
            next(args, None)  # `--name VALUE`


def _takes_value(arg: str, fields: dict[str, type], names: dict[str, Flag]) -> bool:
    """Whether flag `arg` takes a value (booleans do not); raises for an unknown name."""
    name = arg.lstrip("-").split("=", 1)[0]
    if name == "flagfile":  # absl reads the flags in that file itself
        return True
    for prefix in ("config.", "noconfig."):
        if name.startswith(prefix):
            path = name[len(prefix) :]
            if path not in fields:
                raise CommandLineError(_unknown("config field", path, fields, arg))
            return fields[path] is not bool
    flag = names.get(name) or names.get(name.removeprefix("no"))
    if flag is None or (flag.name != name and not isinstance(flag.default, bool)):
        raise CommandLineError(_unknown("flag", name, names, arg))
    return not isinstance(flag.default, bool)


def _fields(config: Any, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted path, type) of every field, nested blocks included."""
    from ml_collections import ConfigDict

    for key in config:
        path = f"{prefix}{key}"
        value = config[key]
        yield path, config.get_type(key) if hasattr(config, "get_type") else type(value)
        if isinstance(value, ConfigDict):
            yield from _fields(value, f"{path}.")


def _unknown(kind: str, name: str, valid: Any, arg: str) -> str:
    nearest = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.0)
    hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
    return f"unknown {kind} {name!r} in {arg}{hint}"


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


# --- values, through ml-collections -------------------------------------------------------------


def _parse_with_absl(
    command: str, argv: list[str], config: Any, flags: Sequence[Flag]
) -> dict[str, Any]:
    from absl import flags as absl_flags
    from ml_collections import config_flags

    flag_values = absl_flags.FlagValues()
    full_argv = [f"cacherl {command}", *argv]
    # sys_argv tells ml-collections which `--config.X` overrides to define (default: sys.argv).
    config_flags.DEFINE_config_dict(
        "config", config, "the config", flag_values=flag_values, sys_argv=full_argv
    )
    define = {
        bool: absl_flags.DEFINE_bool,
        int: absl_flags.DEFINE_integer,
        float: absl_flags.DEFINE_float,
    }
    for flag in flags:
        define.get(type(flag.default), absl_flags.DEFINE_string)(
            flag.name, flag.default, flag.help, flag_values=flag_values
        )
    try:
        flag_values(full_argv)
    except absl_flags.Error as err:
        raise CommandLineError(_one_line(err)) from None
    return {flag.name: flag_values[flag.name].value for flag in flags}


# --- help ---------------------------------------------------------------------------------------


def _help(command: str, flags: Sequence[Flag], summary: str, example: str, spec: str | None) -> str:
    rows = [
        ("--config=FILE[:VARIANT]", f"the config file and its variant, e.g. {example} (required)"),
        ("--config.FIELD=VALUE", "set one field of the config (with --config, --help lists them)"),
        *((flag.usage(), flag.describe()) for flag in flags),
    ]
    lines = [
        f"usage: cacherl {command} --config=FILE[:VARIANT] [--config.FIELD=VALUE ...] [flags]",
        "",
        summary,
        "",
        "flags:",
        *(f"  {name:<26} {text}" for name, text in rows),
    ]
    if spec is not None:
        config = load_config(spec)
        lines += ["", f"config fields of {spec} (--config.FIELD=VALUE sets one):"]
        lines += [f"  {path} = {value!r}" for path, value in _values(config)]
    return "\n".join(lines)


def _values(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    from ml_collections import ConfigDict

    for key in config:
        value = config[key]
        if isinstance(value, ConfigDict):
            yield from _values(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
