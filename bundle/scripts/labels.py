"""Names of the label values: the ``label_names`` config value (``{"left_atrium": 1}``) read in one place.

Every config of the bundle declares ``label_names``, a ``{name: label value}`` dict of the foreground
classes (background, 0, is implicit), e.g. ``{"left_atrium": 1}`` in ``la.yaml``, or
``{"liver": 1, "tumour": 2}`` with ``num_classes: 3``. The evaluation reports, the montage legends, the
MONAI Label infer task (what a viewer such as 3D Slicer shows) and ``metadata.json`` name classes with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .config import ConfigError

__all__ = ["BACKGROUND", "class_names"]

BACKGROUND = "background"


def class_names(label_names: Mapping[str, Any] | None, num_classes: int | None = None) -> dict[int, str]:
    """``{label value: name}`` of every class, background (0) included, from a ``label_names`` config value.

    Args:
        label_names: ``{name: value}`` of the foreground classes (values 1 .. num_classes - 1); None names
            every foreground value ``class_<value>``.
        num_classes: the number of classes, background included; when given, ``label_names`` must name
            every foreground value ``1 .. num_classes - 1`` exactly once.

    Returns:
        the names by label value, in value order.

    Raises:
        ConfigError: ``label_names`` is not a dict of names to integers, names background or value 0, gives
            one value two names, a name twice (in another case), a name that is not a word
            (letters, digits, ``_``, ``-``, spaces), or does not cover ``1 .. num_classes - 1``.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
        raise ConfigError(f"num_classes must be an integer >= 2 (background and one class), found {num_classes!r}.")
    if label_names is None:
        return {0: BACKGROUND, **{c: f"class_{c}" for c in range(1, num_classes or 2)}}
    if not isinstance(label_names, Mapping) or not label_names:
        raise ConfigError(
            f"label_names must be a dict of class names to label values, e.g. {{\"left_atrium\": 1}}; found {label_names!r}."
        )
    names: dict[int, str] = {0: BACKGROUND}
    problems = []
    for name, value in label_names.items():
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"'{name}': the label value must be an integer, found {value!r}")
        elif not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w\- ]*", name):
            problems.append(f"{name!r}: a class name is a word (letters, digits, '_', '-', spaces)")
        elif name.lower() == BACKGROUND or value == 0:
            problems.append(f"'{name}': {value}: background (0) is implicit, name the foreground classes only")
        elif value < 0 or (num_classes is not None and value >= num_classes):
            bound = f"1..{num_classes - 1} (num_classes={num_classes})" if num_classes else ">= 1"
            problems.append(f"'{name}': label value {value} outside {bound}")
        elif value in names:
            problems.append(f"'{name}' and '{names[value]}' both name label value {value}")
        elif name.lower() in (n.lower() for n in names.values()):
            problems.append(f"'{name}' is given twice")
        else:
            names[value] = name
    if not problems and num_classes is not None:
        missing = [c for c in range(1, num_classes) if c not in names]
        if missing:
            problems.append(f"label values {missing} have no name (num_classes={num_classes} needs names for 1..{num_classes - 1})")
    if problems:
        raise ConfigError(f"label_names {dict(label_names)}: " + "; ".join(problems) + ".")
    return dict(sorted(names.items()))
