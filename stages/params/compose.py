"""params.yaml made and read: Hydra composes it from conf/, `-S` changes it, `load` reads it.

conf/ decides every value: conf/config.yaml, then the chosen dataset's, model's and recipe's
files (conf/dataset/, conf/model/, conf/recipe/), then `-S` overrides. `dvc exp run` composes
them into params.yaml before the stages run; `compose()` does the same for `convnet compose` and
for a stage's `-S model=...`. `dvc repro` and every stage read params.yaml as it stands.

params.yaml is read as DVC reads it: YAML 1.2 (ruamel.yaml), so DVC and the stages agree on
every value (`yes` is a string to both). Hydra reads conf/ as YAML 1.1 (PyYAML), in `dvc exp
run` too, where nothing of this project runs yet: `check_conf` refuses a conf/ value that the
two readings take differently (`017`, `1:30`, `yes`), naming its file, line and column.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.core.errors import ParamsError
from stages.params.schema import Params, flatten, from_dict

# The config groups of conf/: a `-S` naming one of them picks a file of that folder.
GROUPS = ("dataset", "model", "recipe")
_DELETE = object()  # the value of a `~key` override: take the key out


def read(path: Path | str) -> dict[str, Any]:
    """params.yaml (or any YAML mapping) as DVC reads it: YAML 1.2, a key given twice is an
    error. ParamsError names the file, and for YAML errors the line and column."""
    from ruamel.yaml import YAML, YAMLError

    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: not found; run from the repository root")
    if not path.is_file():
        raise ParamsError(f"{path}: not a file; --params takes a YAML file like params.yaml")
    try:
        data = YAML(typ="safe").load(path.read_text())
    except YAMLError as err:
        raise ParamsError(f"{path}: {_yaml_problem(err)}") from None
    except UnicodeDecodeError:
        raise ParamsError(f"{path}: not a text file; --params takes a YAML file") from None
    if data is None or data == {}:
        raise ParamsError(f"{path}: is empty; it must set the pipeline's parameters")
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: must be a mapping of keys to values")
    return data


def _yaml_problem(err: Exception) -> str:
    """ruamel's multi-line report as one phrase: where, what, and inside what."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return f"not valid YAML ({' '.join(str(err).split())[:200]})"
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    problem = problem.split(' with value "')[0]  # a duplicate key: the value adds nothing
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    inside = f" ({context} that starts on line {start.line + 1})" if context and start else ""
    return f"not valid YAML: {where}: {problem}{inside}"


def conf_dir(params_file: Path | str) -> Path:
    """The conf/ folder that params.yaml is composed from: beside it."""
    return Path(params_file).resolve().parent / "conf"


def check_conf(conf: Path) -> None:
    """Every file of conf/ read as YAML 1.2 (a syntax error or a key given twice is refused)
    and as Hydra reads it (YAML 1.1); ParamsError names the first value the two read
    differently, with its file, line and column.

    Hydra's loader is PyYAML's, inside Hydra and inside DVC: a custom loader here would not
    reach `dvc exp run`, so the files are held to what both readings agree on instead.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from ruamel.yaml import YAML, YAMLError

    for path in sorted(conf.rglob("*.yaml")):
        name = path.relative_to(conf.parent)
        try:
            text = path.read_text()
            new = YAML().load(text)  # round trip: each value keeps its line and column
            old = OmegaConf.to_container(OmegaConf.create(text))
        except YAMLError as err:
            raise ParamsError(f"{name}: {_yaml_problem(err)}") from None
        except (yaml.YAMLError, OmegaConfBaseException) as err:  # what YAML 1.2 accepted
            raise ParamsError(f"{name}: Hydra cannot read it: {str(err).splitlines()[0]}") from None
        except UnicodeDecodeError:
            raise ParamsError(f"{name}: not a text file") from None
        found = _disagreement({} if new is None else new, old, (0, 0))
        if found:
            new_value, old_value, (line, column) = found
            raise ParamsError(
                f"{name}: line {line + 1}, column {column + 1}: YAML 1.2 (DVC, params.yaml)"
                f" reads {_plain(new_value)!r} but YAML 1.1 (Hydra, conf/) reads"
                f" {_plain(old_value)!r}; write it so both agree (quote a string, true/false"
                " for a boolean, a number without leading zeros)"
            )


def _disagreement(new: Any, old: Any, at: tuple[int, int]) -> tuple[Any, Any, Any] | None:
    """(YAML 1.2's value, YAML 1.1's, (line, column)) of the first value, or key, that the two
    readings of one file (`new`: ruamel's, which records positions) take differently."""
    if isinstance(new, dict) and isinstance(old, dict) and len(new) == len(old):
        for (key, value), (old_key, old_value) in zip(new.items(), old.items(), strict=True):
            found = _disagreement(key, old_key, new.lc.key(key))
            if found := found or _disagreement(value, old_value, new.lc.value(key)):
                return found
        return None
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        for i, (value, old_value) in enumerate(zip(new, old, strict=True)):
            if found := _disagreement(value, old_value, new.lc.item(i)):
                return found
        return None
    same = type(_plain(new)) is type(_plain(old)) and (
        new == old or (isinstance(new, float) and math.isnan(new) and math.isnan(old))
    )
    return None if same else (new, old, at)


def _plain(value: Any) -> Any:
    """ruamel's scalar types (ScalarInt, ScalarFloat, quoted strings) as Python's own."""
    kind = next((k for k in (bool, int, float, str) if isinstance(value, k)), None)
    return kind(value) if kind else value


def compose(conf: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """conf/ composed as `dvc exp run -S <overrides>` composes params.yaml, as plain dicts.

    The same Hydra calls DVC makes (compose, then resolve); `yaml_text()` writes the result as
    DVC writes params.yaml. A failure is one ParamsError: a conf/ file that is not valid YAML
    or that YAML 1.1 and 1.2 read differently, an unknown group option or key, a malformed
    override, a key some file should have set left `???`.
    """
    if not (conf / "config.yaml").is_file():
        raise ParamsError(f"{conf}/config.yaml: not found; params are composed from conf/")
    _parse(overrides)  # its messages name the override; Hydra's are long
    check_conf(conf)
    return _compose(conf, overrides)


def _compose(conf: Path, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Hydra's composition alone (`compose` without checking the files first)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(conf.resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
        data = OmegaConf.to_container(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ParamsError(_hydra_problem(str(err), conf, overrides)) from None
    if missing:
        raise ParamsError(
            f"{missing[0]}: no value; conf/config.yaml marks it ??? for every file of a group"
            " (conf/dataset/ or conf/model/) to set, and the chosen one does not"
        )
    return data


def _hydra_problem(text: str, conf: Path, overrides: list[str] | tuple[str, ...]) -> str:
    """Hydra's report (several lines, its search path) as one line naming the key."""
    if found := re.search(r"Could not find '(\w+)/([^']*)'", text):
        group, name = found.groups()
        options = sorted(f.stem for f in (conf / group).glob("*.yaml"))
        return f"{group}: no {group} {name!r} in conf/{group}/; one of: {', '.join(options)}"
    if found := re.search(r"Could not override '([^']+)'", text):
        return (
            f"{found.group(1)}: not a key of params.yaml for this dataset and model"
            " (`convnet compose` shows them all)"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(text).__name__
    return f"-S {' '.join(overrides) or '(none)'}: {first}"


def yaml_text(data: dict[str, Any]) -> str:
    """`data` written as DVC writes a composed params.yaml (OmegaConf's YAML)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(data))


def choices(data: dict[str, Any]) -> list[str]:
    """The group choices a params.yaml records, as overrides: ["dataset=digits", ...]."""
    picked = [f"{g}={data[g]}" for g in GROUPS if isinstance(data.get(g), str)]
    return [c for c in picked if c != "recipe=none"]


Check = Callable[[Params], None]


def load(
    path: Path | str = "params.yaml",
    overrides: list[str] | tuple[str, ...] = (),
    check: Check | None = None,
) -> Params:
    """Read params.yaml, apply `-S` overrides, validate, return Params. Errors name the file.

    The overrides take Hydra's syntax, as `dvc exp run -S` does. A plain key (`train.lr=0.05`)
    changes that value of params.yaml as it stands. Choosing a dataset, model or recipe
    (`model=resnet50`) composes conf/ (beside params.yaml) with all the overrides, exactly as
    `dvc exp run -S ...` would, so the model comes with its own values. Inside `dvc exp run`,
    which has just composed params.yaml, conf/ is checked as `compose` checks it.
    `check`: see `validate`.
    """
    path = Path(path)
    data = read(path)
    parsed = _parse(overrides)
    conf = conf_dir(path)
    if any(key in GROUPS for key, _ in parsed):
        data = compose(conf, overrides)
    else:
        if os.environ.get("DVC_EXP_NAME") and (conf / "config.yaml").is_file():
            check_conf(conf)
        data = _apply(data, parsed)
    try:
        return validate(data, check)
    except ParamsError as err:  # named where the value came from: -S or the file
        given = any(str(err).startswith(f"{key}:") for key, _ in parsed)
        raise ParamsError(f"-S {err}" if given else f"{path}: {err}") from None


def validate(data: dict[str, Any], check: Check | None = None) -> Params:
    """`data` as Params: the schema's rules, then `check`'s, the one validation of params.

    `check` asks what the schema cannot know (stages.params.registries: the dataset and the
    model exist, the crop fits their images, `net` holds the model's options); the CLI hands
    it in so that the stages' own code, which imports this module, imports no registry.
    """
    p = from_dict(data)
    if check is not None:
        check(p)
    return p


def _parse(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """(key, value) of each `key=value` (`+key=value` adds one, `~key` takes one out), its
    value read by Hydra's override grammar (what `dvc exp run -S` reads: `1e-3` a number,
    `[a,b]` a list, `null` None)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parsed = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not (sep or item.startswith("~")) or not key.strip("+~"):
            raise ParamsError(f"-S {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        try:
            [override] = OverridesParser.create().parse_overrides([item])
        except HydraException as err:
            problem = " ".join(str(err).split())
            raise ParamsError(f"-S {item!r}: not a valid override ({problem})") from None
        if override.is_sweep_override():
            raise ParamsError(
                f"-S {item!r}: a sweep runs one experiment per value; a stage takes one"
                " value (`dvc exp run --queue -S ...` runs the sweep)"
            )
        value = _DELETE if override.is_delete() else override.value()
        if override.key_or_group in GROUPS and isinstance(value, list | dict):
            group = override.key_or_group  # Hydra would merge the files of all of them
            raise ParamsError(
                f"-S {item!r}: one {group} at a time, a file of conf/{group}/ (`dvc exp run"
                f" --queue -S '{group}=a,b'` runs one experiment each)"
            )
        parsed.append((override.key_or_group, value))
    return parsed


def _apply(data: dict[str, Any], parsed: list[tuple[str, Any]]) -> dict[str, Any]:
    """`data` with each parsed override applied: OmegaConf sets the dotted key (a key the file
    lacks is added, for the schema to name it unknown); `~key` takes the key out."""
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.create(data)
    for key, value in parsed:
        if value is _DELETE:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if isinstance(node, DictConfig):
                node.pop(leaf, None)
        else:
            OmegaConf.update(cfg, key, value, merge=True)
    return OmegaConf.to_container(cfg)


def drift(path: Path | str, p: Params) -> list[str]:
    """The keys where params.yaml differs from what conf/ composes for its own dataset, model
    and recipe: values a `-S` or a hand edit put there, which the next `dvc exp run` replaces
    by conf/'s. Empty where there is no conf/ beside params.yaml, or nothing differs."""
    conf = conf_dir(path)
    if not (conf / "config.yaml").is_file():
        return []
    try:  # without check_conf (a third of the time): a note needs no verdict on conf/
        composed = flatten(_compose(conf, choices(p.to_dict())))
    except ParamsError:
        return []  # a conf/ that does not compose is not this run's problem
    here = flatten(p.to_dict())
    return sorted(k for k in here.keys() | composed.keys() if here.get(k) != composed.get(k))
