"""Experiment tracking with MLflow through MONAI's own switch, ``--tracking mlflow``.

``python -m monai.bundle run training --config_file ... --tracking mlflow`` makes MONAI add an
``MLFlowHandler`` to ``train#handlers`` and ``validate#handlers`` (``monai.bundle.utils.DEFAULT_EXP_MGMT_SETTINGS``).
Out of the box that handler logs only the total loss of the trainer. :func:`configure_mlflow`, a step of
``train.yaml``'s ``initialize``, completes the trainer's handler before anything is built, so the MLflow run
holds what TensorBoard shows and more:

- parameters: every plain value of the configuration (``lr``, ``lambda_u``, ``patch_size``, ...);
- metrics: every loss term, ramped weight and learning rate of the trainer output (:func:`loss_terms`)
  every ``log_interval`` iterations, and the validation Dice (``val_mean_dice``, per trainer epoch);
- artifacts: the run's configuration (``config.json``) and the best ensemble (``models/model.pt``).

The store is local by default: ``<output_dir>/mlruns.db`` (SQLite, the backend MLflow recommends; MONAI
refuses the deprecated file store) with the artifacts in ``<output_dir>/mlruns/``; ``--tracking_uri``
points elsewhere (e.g. an MLflow server). Without ``--tracking`` nothing here runs and TensorBoard
logs as always. mlflow is an optional extra: ``pip install "monai_dualssl[mlflow]"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from monai.bundle import ConfigParser

from .config import running_parser

__all__ = ["configure_mlflow", "run_params", "export_config"]

#: keys of the configuration that are not run parameters
_NOT_PARAMS = {"imports", "initialize", "run", "finalize", "training", "evaluating", "_meta_", "train", "validate",
               "state_dict", "checkpointer", "resumer", "rampup", "progress_bar", "network_def", "network"}


def _is_mlflow(item: Any) -> bool:
    return isinstance(item, Mapping) and str(item.get("_target_", "")).split(".")[-1] == "MLFlowHandler"


def configure_mlflow(parser: ConfigParser | None = None) -> int:
    """Complete the trainer's ``MLFlowHandler`` that ``--tracking mlflow`` added (a no-op without it).

    Sets its ``output_transform`` to :func:`loss_terms` (every term, weight and lr), logs every
    ``log_interval`` iterations, its ``experiment_param`` to :func:`run_params` and its ``artifacts``
    to the run's configuration and ``<model_dir>/model.pt``. Call it from ``initialize``, before the
    handlers are built.

    Args:
        parser: the configuration; None takes the one evaluating this call.

    Returns:
        the number of handlers completed.
    """
    parser = parser or running_parser()
    handlers = parser.get("train#handlers") or []
    done = 0
    for i, item in enumerate(handlers):
        if not _is_mlflow(item):
            continue
        key = f"train#handlers#{i}"
        parser[f"{key}#output_transform"] = "$monai_dualssl.loss_terms"
        parser[f"{key}#iteration_log"] = "$lambda engine, event: engine.state.iteration % @log_interval == 0"
        parser[f"{key}#optimizer_param_names"] = []  # lr_a and lr_b are in the output
        parser[f"{key}#experiment_param"] = "$monai_dualssl.run_params()"
        parser[f"{key}#artifacts"] = ["$monai_dualssl.export_config(@output_dir)", "$os.path.join(@model_dir, 'model.pt')"]
        done += 1
    return done


def _plain(value: Any) -> bool:
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(_plain(v) for v in value.values())
    return value is None or isinstance(value, (bool, int, float))


def run_params(config: Mapping | None = None) -> dict[str, str]:
    """The run's parameters for MLflow: every top-level value of ``config`` that is not an expression,
    a reference or a component (JSON text for lists and dicts).

    Args:
        config: the configuration; None takes the running one.
    """
    config = running_parser().get() if config is None else config
    params = {}
    for key, value in config.items():
        if key in _NOT_PARAMS or "#" in key or (isinstance(value, Mapping) and "_target_" in value) or not _plain(value):
            continue
        text = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
        if len(str(text)) <= 1000:  # MLflow limits a parameter's length (long lists are data, not parameters)
            params[key] = text
    return params


def export_config(folder: str | os.PathLike, name: str = "config.json") -> str:
    """Write the running configuration to ``folder/name`` (created) and return the path (an MLflow artifact)."""
    parser = running_parser()
    path = os.path.join(folder, name)
    os.makedirs(folder, exist_ok=True)
    parser.export_config_file(parser.get(), path, indent=2, default=str)
    return path
