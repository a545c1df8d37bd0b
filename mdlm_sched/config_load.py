"""A RunConfig (mdlm_sched.config) from OmegaConf presets in configs/, YAML files and key=value overrides.

`load(args)` takes command-line words in order:
  - `section=name` replaces that section with configs/<section>/<name>.yaml over the section's
    defaults (e.g. `model=large`);
  - `a.b=value` sets one field (OmegaConf dotlist syntax, e.g. `train.steps=200`);
  - any other word is a YAML file merged over the whole config.
A mapping given by a preset or a file (e.g. data.val) replaces the one before it; a dotlist
override such as `data.val.news=...` adds one entry.
Later words win. Unknown keys and impossible values raise ConfigError with a one-line message that
names the field and the fix. Interpolations such as ${data.root} are resolved; nothing is evaluated.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mdlm_sched.config import SECTIONS, RunConfig
from mdlm_sched.config_checks import validate
from mdlm_sched.errors import ConfigError

T = TypeVar("T")


def configs_dir() -> Path:
    """The presets folder: $MDLM_SCHED_CONFIGS, else configs/ of the checkout this package is in."""
    return Path(os.environ.get("MDLM_SCHED_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what}: no such file {path}; check the name (presets live in {configs_dir()})")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in many types
        raise ConfigError(f"{what}: cannot parse {path}: {str(exc).splitlines()[0]}; fix the YAML") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{what}: {path} holds a YAML list, not a mapping of settings; write it as key: value "
                          f"lines (e.g. train: {{steps: 100}})")
    return loaded


def _override(cfg: Any, arg: str) -> Any:
    """cfg with one key=value override merged in; a value YAML cannot parse is a ConfigError."""
    try:
        dotlist = OmegaConf.from_dotlist([arg])
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(f"override {arg!r} is not valid YAML ({problem}); quote a value that holds commas, "
                          f"brackets or ${{...}}, or put it in a YAML file") from exc
    return OmegaConf.merge(cfg, dotlist)


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return f"unknown config key '{key}'; check the spelling against the dataclasses in mdlm_sched/config.py"
    return f"bad value for '{key}': {msg}; give a value of the field's type"


def _merge(cfg: DictConfig, overlay: Any) -> DictConfig:
    """OmegaConf.merge, except that a mapping field (e.g. data.val) given by the overlay replaces the old one."""
    merged = OmegaConf.merge(cfg, overlay)
    _replace_mappings(merged, overlay)
    return merged


def _replace_mappings(target: DictConfig, overlay: DictConfig) -> None:
    for key, value in overlay.items_ex(resolve=False):  # interpolations may point outside the overlay
        if isinstance(value, DictConfig):
            if OmegaConf.get_type(target, key) is dict:  # a plain mapping, not a dataclass section
                target[key] = value
            else:
                _replace_mappings(target[key], value)


def load(args: list[str] | tuple[str, ...] = (), sources: bool = True) -> RunConfig:
    """Build a validated RunConfig from presets, YAML files and key=value overrides (in order); sources=False
    leaves out the check that its data files exist (see config_checks.validate)."""
    cfg = OmegaConf.structured(RunConfig)
    try:
        for arg in args:
            key, eq, value = arg.partition("=")
            if not eq:
                cfg = _merge(cfg, _read_yaml(Path(arg), "config file"))
            elif key in SECTIONS and value and "/" not in value and not value.startswith("{"):
                preset = _read_yaml(configs_dir() / key / f"{value}.yaml", f"preset {key}={value}")
                cfg[key] = _merge(OmegaConf.structured(type(getattr(RunConfig(), key))), preset)
            else:
                cfg = _override(cfg, arg)
        run: RunConfig = OmegaConf.to_object(cfg)  # resolves ${...} interpolations
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from exc
    validate(run, sources)
    return run


def load_structured(schema: type[T], args: list[str] | tuple[str, ...], what: str) -> T:
    """An instance of the dataclass `schema` from YAML files and key=value overrides (in order), unvalidated."""
    cfg = OmegaConf.structured(schema)
    try:
        for arg in args:
            if "=" in arg and not Path(arg).is_file():
                cfg = _override(cfg, arg)
            else:
                cfg = _merge(cfg, _read_yaml(Path(arg), what))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from exc


def replace_typed(instance: T, changes: Mapping[str, Any]) -> T:
    """The dataclass `instance` with the fields in `changes` replaced as a config file's values would be: each
    converted to its field's type or refused (ConfigError), then checked by the dataclass itself."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(instance), dict(changes)))
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from exc


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved beside every result)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(path: str | Path) -> RunConfig:
    """Read a config saved by to_yaml (e.g. a training run's config.yaml)."""
    return load([str(path)])
