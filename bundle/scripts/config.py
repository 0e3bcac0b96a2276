"""Checks of the bundle's configuration before anything runs: switches, types, unknown keys, run folders.

Values given on MONAI's command line arrive through python-fire: ``--resume false`` is the
*string* ``"false"``. :func:`as_bool` reads every boolean switch of the configs; :func:`check_config`
(the first step of ``initialize``) rejects misspelt keys, wrong types and inconsistent schedules
with a :class:`ConfigError` naming the key, before any data is touched; :func:`check_run_folder`
keeps a fresh run from writing over an earlier one.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS, ID_SEP_KEY

__all__ = ["ConfigError", "as_bool", "check_config", "check_run_folder", "RunConfig", "running_parser"]

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
#: keys read by MONAI itself (workflow ids, tracking settings) rather than by ``@`` references
WORKFLOW_KEYS = {"_meta_", "imports", "initialize", "run", "finalize", "training", "evaluating", "tracking"}
PACKAGE_BUNDLE = Path(__file__).resolve().parent.parent   # bundle/ when installed from the bundle folder
TRACKING_KEYS = {k for s in DEFAULT_EXP_MGMT_SETTINGS.values() for k in s.get("configs", {})}
#: the bundle's typed values (booleans go through :func:`as_bool`; ``$`` expressions are not checked)
BOOLEANS = ("synthetic", "resume", "overwrite", "amp", "h5", "entropy_filter", "kl_weighting", "detach_weight",
            "kl_rectify", "use_cps", "use_proto", "use_cos", "jit_optimize")
INTEGERS = ("seed", "num_classes", "raw_num_classes", "batch_labeled", "batch_unlabeled", "num_workers", "n_filters",
            "proj_dim", "rampup_iterations", "max_iterations", "epoch_length", "log_interval", "val_interval",
            "num_labeled", "num_val", "num_threads")
NUMBERS = ("lr", "lambda_u", "lambda_c", "lambda_cos", "alpha", "correction_threshold", "keep_ratio", "temperature",
           "proto_temperature", "dropout", "flip_prob", "rotate_prob", "cache_rate")
CHOICES = {"amp_dtype": ("float16", "bfloat16"), "filter_rule": ("certain", "uncertain"), "filter_scope": ("batch", "class"),
           "proto_on": ("weaker", "both"), "memory_format": ("auto", "contiguous", "channels_last")}
#: values that may change between a run and its resumption (where it runs, how fast, how much it logs)
RESUMABLE_CHANGES = ("resume", "overwrite", "bundle_root", "device", "num_workers", "num_threads", "log_interval",
                     "memory_format", "jit_optimize", "eval_split", "dataset_dir", "_meta_", "tracking", *TRACKING_KEYS)
#: settings added since the first release, with the value that reproduces a run written before each existed: a
#: checkpoint without one resumes only with that value
ADDED_SETTINGS = {"filter_scope": "batch", "strides": [2, 2, 2, 2]}
#: the workflow's lists of steps: a difference is reported, not refused (what they do with the run's settings is
#: compared through the keys they reference)
WORKFLOW_STEPS = ("initialize", "run", "finalize")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, what was expected and what came."""


def as_bool(value: Any, key: str = "value") -> bool:
    """``value`` as a boolean: a bool, 0/1, or one of true/false/yes/no/on/off in any case.

    Raises:
        ConfigError: for anything else, naming ``key``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise ConfigError(f"'{key}' must be a boolean (true/false, True/False or 1/0), found {value!r}.")


def running_parser() -> ConfigParser:
    """The :class:`~monai.bundle.ConfigParser` evaluating the current config expression (found on the call stack).

    Raises:
        RuntimeError: when not called from a config expression.
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return owner
        frame = frame.f_back
    raise RuntimeError("running_parser() must be called from a bundle config expression ('$...').")


def _references(config: Any) -> set[str]:
    """Top-level ids referenced as ``@id`` or ``%id`` anywhere in ``config``."""
    found: set[str] = set()
    if isinstance(config, Mapping):
        for value in config.values():
            found |= _references(value)
    elif isinstance(config, list):
        for value in config:
            found |= _references(value)
    elif isinstance(config, str):
        found |= set(re.findall(r"[@%]([A-Za-z_]\w*)", config))
    return found


def declared_keys(config_dir: str | Path) -> set[str]:
    """Top-level keys defined by the config files (``*.yaml``, ``*.json`` but metadata) of ``config_dir``."""
    files = [p for p in sorted(Path(config_dir).glob("*")) if p.suffix in (".yaml", ".yml", ".json")]
    return {k for f in files if f.name != "metadata.json" for k in ConfigParser.load_config_file(str(f))}


def _unknown_keys(config: Mapping, declared: set[str]) -> list[str]:
    """Messages for top-level keys that no config file declares and no value uses (misspelt overrides)."""
    known = _references(config) | declared | WORKFLOW_KEYS | TRACKING_KEYS
    messages = []
    for key in sorted(k for k in config if k not in known and "#" not in k):
        close = difflib.get_close_matches(key, sorted(k for k in known if k in config), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        messages.append(f"unknown key '{key}': no config file declares it and no value uses it{hint}")
    return messages


def _expression(value: Any) -> bool:
    """Whether ``value`` is an expression or a reference, checked where it is evaluated."""
    return isinstance(value, str) and value.startswith(("$", "@", "%"))


def _type_problems(config: Mapping) -> list[str]:
    """Messages for values of the typed keys that have the wrong type (expressions are left to run)."""
    problems = []
    for keys, kind, ok in (
        (INTEGERS, "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
        (NUMBERS, "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    ):
        for key in keys:
            value = config.get(key)
            if value is None or _expression(value) or ok(value):
                continue
            problems.append(f"'{key}' must be {kind}, found {value!r}")
    for key, allowed in CHOICES.items():
        if key in config and not _expression(config[key]) and config[key] not in allowed:
            problems.append(f"'{key}' must be one of {', '.join(allowed)}, found {config[key]!r}")
    for key in BOOLEANS:
        value = config.get(key)
        if key in config and not _expression(value):
            try:
                as_bool(value, key)
            except ConfigError as e:
                problems.append(str(e).rstrip("."))
    return problems


def _schedule_problems(config: Mapping) -> list[str]:
    """Messages for a schedule that would not run ``max_iterations`` exactly."""
    total, length = config.get("max_iterations"), config.get("epoch_length")
    if not (isinstance(total, int) and isinstance(length, int)):
        return []
    if length < 1 or total < length or total % length:
        lower, upper = max(total // max(length, 1), 1) * length, -(-total // max(length, 1)) * length
        return [
            f"max_iterations ({total}) must be a positive multiple of epoch_length ({length}), the checkpoint "
            f"interval: e.g. --max_iterations {lower}" + (f" or {upper}" if upper != lower else "")
            + f", or --epoch_length {total}"
        ]
    return []


def _report_last(kind, error, tb) -> None:
    """``sys.excepthook`` that repeats the root cause of an error as the last lines printed.

    MONAI wraps an error raised in a config expression in "Failed to evaluate ConfigExpression"; the
    user's problem (a data, configuration or run error) is at the bottom of the chain.
    """
    traceback.print_exception(kind, error, tb)
    cause = error
    while (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    if cause is not error:
        print(f"\n{type(cause).__name__}: {cause}", file=sys.stderr)


def check_config(parser: ConfigParser | None = None) -> None:
    """Check the running configuration before anything is built or read.

    Rejects top-level keys that neither a config file of the bundle (``<bundle_root>/configs`` or
    the bundle this package belongs to) declares nor any value uses (a misspelt ``--max_iteration 5`` would otherwise be ignored), typed values of the wrong type (``--keep_ratio abc``), booleans that are not booleans
    and a ``max_iterations`` that is not a multiple of ``epoch_length``. From the command line, the
    root cause of any error (a configuration or data problem) is repeated as the last lines printed,
    after MONAI's traceback.

    Args:
        parser: the configuration; None takes the one evaluating this call (:func:`running_parser`).

    Raises:
        ConfigError: listing every problem.
    """
    sys.excepthook = _report_last
    parser = parser or running_parser()
    config = parser.get()
    bundle_root = Path(parser.get_parsed_content("bundle_root"))
    bundles = {bundle_root, PACKAGE_BUNDLE}
    declared = set().union(*(declared_keys(root / "configs") for root in bundles))
    if not declared:  # a wheel install holds the package only, and bundle_root is not a bundle folder
        raise ConfigError(
            f"no bundle found: bundle_root '{bundle_root}' holds no configs/ folder and monai_dualssl is installed "
            "without its bundle. Run from the folder holding bundle/, or pass --bundle_root <bundle folder> (the "
            "folder holding configs/ and models/)."
        )
    problems = _unknown_keys(config, declared) + _type_problems(config) + _schedule_problems(config)
    if problems:
        raise ConfigError("configuration problem(s):\n  " + "\n  ".join(problems))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def check_run_folder(output_dir: str, model_dir: str, resume: Any, overwrite: Any) -> None:
    """Refuse a fresh run that would write over an earlier run's files.

    A fresh run (``resume`` false) needs an empty or missing ``output_dir`` and no ``model.pt`` in
    ``model_dir``; ``overwrite`` true removes the earlier run's checkpoints (``model.pt`` and
    ``best.pt`` are then replaced at the first validation). ``resume`` true continues the run found
    there (see :class:`RunConfig` for the check that it is the same run).

    Raises:
        ConfigError: naming the folder and the switches that continue or replace it.
    """
    if as_bool(resume, "resume"):
        return
    output, model = Path(output_dir), Path(model_dir) / "model.pt"
    earlier = _files(output) + ([model] if model.is_file() else [])
    if not earlier:
        return
    if not as_bool(overwrite, "overwrite"):
        shown = ", ".join(str(p) for p in earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        if earlier == [model]:
            raise ConfigError(
                f"model_dir {model.parent} already holds a model.pt that this run would replace at its first "
                "validation (the bundle's shipped model, or an earlier run's). Replace it with --overwrite True, or "
                "write elsewhere with --model_dir <folder>."
            )
        raise ConfigError(
            f"the run folder {output} already holds an earlier run ({shown}). Continue it with --resume True, "
            f"replace it with --overwrite True, or choose another --run_name."
        )
    for path in _files(output):
        if path.suffix == ".pt" or path.name.startswith("events.out.tfevents"):
            path.unlink()
    logging.getLogger(__name__).warning(f"overwrite: removed the earlier run's checkpoints and logs in {output}.")


def _fixed(config: Mapping) -> dict:
    """``config`` without the keys a resumed run may change (:data:`RESUMABLE_CHANGES`)."""
    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}


class RunConfig:
    """The run's configuration as a checkpoint entry: a resumed run must be the same run.

    ``state_dict()`` holds the configuration (JSON) and its hash; ``load_state_dict`` compares it with
    the running configuration value by value (nested sections by their ``a#b#c`` paths), ignoring
    :data:`RESUMABLE_CHANGES` on both sides (a checkpoint written before a key became resumable still
    holds it). Refused: a value both have and that differs; a key only one side has, unless it is a plain
    reference (``"@a#b"``, the wiring of a setting that is itself compared) or a setting of
    :data:`ADDED_SETTINGS` missing from the checkpoint and set to its earlier value. Keys accepted that way and
    differing :data:`WORKFLOW_STEPS` are named in a warning.

    Args:
        config: the configuration; None takes the running one (:func:`running_parser`).

    Raises:
        ConfigError: on resume, when a value differs (each differing key with both values).
    """

    def __init__(self, config: Mapping | None = None) -> None:
        raw = running_parser().get() if config is None else config
        self.config = _fixed(json.loads(json.dumps(raw, default=str)))

    def state_dict(self) -> dict:
        text = json.dumps(self.config, sort_keys=True)
        return {"config": text, "sha256": hashlib.sha256(text.encode()).hexdigest()}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("sha256") == self.state_dict()["sha256"]:
            return
        saved, now = _comparable(state["config"]), _comparable(json.dumps(self.config))
        unset = "<not set>"
        shown = lambda value: value if value == unset else repr(value)  # noqa: E731
        refused, noted = [], []
        for key in sorted(saved.keys() | now.keys()):
            before, after = saved.get(key, unset), now.get(key, unset)
            if before == after:
                continue
            one_side = before == unset or after == unset
            earlier = key in ADDED_SETTINGS and before == unset and after == ADDED_SETTINGS[key]
            if key in WORKFLOW_STEPS or earlier or (one_side and _wiring(after if before == unset else before)):
                noted.append(f"{key}: checkpoint {shown(before)}, now {shown(after)}")
            else:
                hint = (f" (runs written before {key} existed used {ADDED_SETTINGS[key]!r})"
                        if key in ADDED_SETTINGS and before == unset else "")
                refused.append(f"{key}: checkpoint {shown(before)}, now {shown(after)}{hint}")
        if refused:
            raise ConfigError(
                "--resume: the checkpoint belongs to a run with another configuration:\n  " + "\n  ".join(refused[:20])
                + "\nResume with the same values, or start a fresh run (--overwrite True or another --run_name)."
            )
        if noted:
            logging.getLogger(__name__).warning(
                "--resume: the checkpoint was written by another version of the bundle; resuming with these "
                "differences, which leave the run's settings as they were:\n  " + "\n  ".join(noted[:20])
            )


def _wiring(value: Any) -> bool:
    """Whether ``value`` is a plain reference to another key (``"@a#b"``)."""
    return isinstance(value, str) and re.fullmatch(r"@[\w#]+", value) is not None


def _comparable(text: str) -> dict:
    """The leaves (:func:`_leaves`) of a JSON configuration without :data:`RESUMABLE_CHANGES`, references spelled
    ``a#b`` (MONAI writes them ``a::b`` in the parsed configuration, versions differ)."""
    return _leaves(_fixed(json.loads(text.replace(ID_SEP_KEY, "#"))))


def _leaves(config: Mapping, prefix: str = "") -> dict:
    """``{"a#b#c": value}`` for every value of ``config`` that is not a non-empty mapping (MONAI's ``#`` paths)."""
    out: dict = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_leaves(value, path + "#"))
        else:
            out[path] = value
    return out
