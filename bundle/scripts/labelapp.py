"""
MONAI Label backend: serve the bundle, retrain both networks on the datastore, and rank the
unlabeled images by how unsure the two networks are about them.

Needs ``monailabel`` (0.8.5; it pins numpy<2, so give it its own environment) and is not imported by
``import monai_dualssl``. ``python -m monai_dualssl.labelapp <folder>`` writes a MONAI Label app folder
(its ``main.py``; MONAI Label writes the server's log to ``<folder>/logs/app.log``) and prints its path.
Start a server on a folder of images with it, from that environment (activated: the ``monailabel``
launcher runs the ``python`` on PATH)::

    monailabel start_server --app "$(python -m monai_dualssl.labelapp dualssl_app)" \\
        --studies /data/images --conf bundle /path/to/bundle

The app offers the infer and train task ``dualssl`` (labels named by the bundle's ``label_names``), the
scoring method ``dualssl`` (the expected Dice error and the disagreement of every unlabeled image, from
one inference pass; run after every training and every "next sample" request) and a strategy per score
(the unlabeled image of highest score), beside MONAI Label's ``random`` and ``first``. The default,
``expected_dice`` (``--conf strategy <name>`` for another), is listed first in the app's info (clients
such as 3D Slicer preselect it) and taken by ``next_sample`` requests that name no strategy (REST
requests always name one: ``POST /activelearning/<strategy>``).
Training writes the bundle's ``runs/monailabel`` and ``models/model.pt``: give a bundle folder you may
write to.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.tasks.activelearning.epistemic import Epistemic
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import name_to_device

from .inference import disagreement_score, expected_dice_error, load_weights
from .labels import class_names

__all__ = ["DualNetScoring", "DualSSLApp", "DualSSLInferTask", "DualSSLTrainTask", "create_app", "default_bundle"]

logger = logging.getLogger(__name__)

#: the scores of :class:`DualNetScoring` (each also a strategy: the unlabeled image of highest score)
SCORES = {
    "expected_dice": "Unlabeled image whose segmentation the ensemble expects to be worst (expected Dice error)",
    "disagreement": "Unlabeled image the two networks disagree on most (mean KL over the predicted foreground)",
}
SCORE_KEYS = {name: f"dualssl_{name}" for name in SCORES}  # their keys in the datastore's image info
TS_KEY = "dualssl_ts"  # the time stamp of the model that scored an image
#: the "next image" strategy of a request that names none (``--conf strategy <name>`` sets another):
#: of the scores, the expected Dice error follows the Dice error best (Spearman 0.87 vs 0.63 on LA)
DEFAULT_STRATEGY = "expected_dice"
APP_MAIN = '''"""MONAI Label app of the monai_dualssl bundle (written by ``python -m monai_dualssl.labelapp``).

    monailabel start_server --app <this folder> --studies <images> --conf bundle <bundle folder>
"""

from monai_dualssl.labelapp import DualSSLApp  # noqa: F401 (MONAI Label finds the app class here)
'''


def create_app(folder: str | os.PathLike) -> str:
    """Write the MONAI Label app folder ``folder`` (its ``main.py``) and return its absolute path.

    MONAI Label keeps the server's log in ``<folder>/logs/app.log``: the app lives where the user chooses,
    outside the package. The ``main.py`` of another app is not overwritten.

    Raises:
        FileExistsError: ``folder/main.py`` exists and is not this app's.
    """
    folder = Path(folder).resolve()
    main = folder / "main.py"
    if main.is_file() and "from monai_dualssl.labelapp import DualSSLApp" not in main.read_text():
        raise FileExistsError(f"{main} exists and is not the monai_dualssl app; choose another folder.")
    folder.mkdir(parents=True, exist_ok=True)
    main.write_text(APP_MAIN)
    return str(folder)


def default_bundle() -> str:
    """The bundle folder this package was installed from (``bundle/``, holding ``configs`` and ``models``).

    Raises:
        FileNotFoundError: the package is not inside a bundle folder (installed from a wheel, which holds the
            Python package only): the bundle folder must be given with ``--conf bundle <folder>``.
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / "configs" / "inference.json").is_file():
        raise FileNotFoundError(
            "monai_dualssl is installed without its bundle (a wheel holds the Python package only): start the server "
            "with --conf bundle <folder>, the bundle folder holding configs/inference.json and models/model.pt (the "
            "repository's bundle/ folder, or a copy of it)."
        )
    return str(root)


class DualSSLInferTask(BundleInferTask):
    """MONAI Label's :class:`BundleInferTask` for this bundle (``inference.json``, ``models/model.pt``),
    its labels named by ``inference.json``'s ``label_names`` (``{"left_atrium": 1}`` for the shipped model).

    The request key ``image_path`` is held back while the preprocessing runs: MONAI 1.6's ``Spacingd``
    updates every key starting with ``image_`` as if it were a metadata dict, which fails on that string.
    """

    def __init__(self, path: str, conf: dict, **kwargs):
        super().__init__(path, conf, **kwargs)
        # the labels a viewer shows: the config's label_names (metadata.json's channel_def agrees); a bundle
        # without label_names keeps MONAI Label's reading of channel_def
        if self.valid and "label_names" in self.bundle_config:
            names = class_names(self.bundle_config.get_parsed_content("label_names"),
                                self.bundle_config.get_parsed_content("num_classes"))
            self.labels = {name: value for value, name in names.items() if value > 0}

    def run_pre_transforms(self, data: dict, transforms):
        path = data.pop("image_path", None)
        data = super().run_pre_transforms(data, transforms)
        if path is not None:
            data["image_path"] = path
        return data


class DualSSLTrainTask(BundleTrainTask):
    """MONAI Label's :class:`BundleTrainTask` training both networks semi-supervised on the datastore.

    The datastore's labeled images (minus the ``val_split`` share, which validates) are the labeled set,
    its unlabeled images the unlabeled set (none: supervised only); training continues from
    ``models/model.pt`` (both networks) and writes the best ensemble back there, where the infer task
    picks it up. ``max_epochs`` of a request counts the bundle's epochs of ``epoch_length`` iterations,
    so the lr schedule and ramp-up (fractions of ``max_iterations``) follow it.

    Args:
        path: the bundle folder.
        conf: the app's configuration.
        overrides: bundle config values for every run (e.g. ``{"patch_size": [96, 96, 64]}``).
        kwargs: passed to :class:`BundleTrainTask`.
    """

    def __init__(self, path: str, conf: dict, overrides: dict | None = None, **kwargs):
        super().__init__(path, conf, **kwargs)
        self.overrides = dict(overrides or {})
        self._unlabeled: list[dict] = []

    def __call__(self, request: dict, datastore: Datastore):
        self._unlabeled = [{"image": datastore.get_image_uri(i)} for i in datastore.get_unlabeled_images()]
        logger.info(f"Unlabeled images for training: {len(self._unlabeled)}")
        return super().__call__(request, datastore)

    def _update_overrides(self, overrides: dict) -> dict:
        epochs = int(overrides.pop(self.const.key_train_trainer_max_epochs()))
        models = os.path.join(self.bundle_path, "models")  # where the infer task reads model.pt
        # every request is a fresh run in runs/monailabel that replaces the previous one's checkpoints
        # the classes of the model the infer task serves
        infer = ConfigParser.load_config_file(os.path.join(self.bundle_path, "configs", "inference.json"))
        served = {k: infer[k] for k in ("num_classes", "label_names") if k in infer}
        overrides.update({"run_name": "monailabel", "model_dir": models, "resume": False, "overwrite": True, **served,
                          **self.overrides})
        epoch_length = int(overrides.get("epoch_length", self.bundle_config["epoch_length"]))
        overrides["max_iterations"] = epochs * epoch_length
        if self._unlabeled:
            overrides["train#unlabeled_dataset#data"] = self._unlabeled
        else:
            overrides["train#trainer#unlabeled_data_loader"] = None
        key_val = self.const.key_validate_dataset_data()
        if not overrides.get(key_val):  # the bundle's own validation list is not the datastore's
            logger.warning("no validation images (val_split): the best model is chosen on the training images")
            overrides[key_val] = overrides[self.const.key_train_dataset_data()]
        return overrides


class DualNetScoring(ScoringMethod):
    """
    Score every unlabeled image by how unsure the two networks are about it, each score of
    :data:`SCORES` from one inference pass (:func:`monai_dualssl.inference.expected_dice_error`, the Dice
    error the ensemble expects of its own segmentation; :func:`~monai_dualssl.inference.disagreement_score`,
    the mean symmetric KL between the networks over the predicted foreground dilated by ``margin`` voxels).
    Images are re-scored when ``models/model.pt`` changes. Score ``name`` goes to the datastore's image
    info under ``dualssl_<name>`` (:data:`SCORE_KEYS`), the model's time stamp under ``dualssl_ts``.

    Args:
        path: the bundle folder.
        config: the inference config in ``configs`` (network, preprocessing, inferer).
        margin: dilation of the predicted foreground for the disagreement score, in voxels of the
            preprocessed image.
    """

    def __init__(self, path: str, config: str = "inference.json", margin: int = 3):
        super().__init__("Expected Dice error and disagreement of the two networks (one inference pass)")
        self.margin = margin
        self.model_path = os.path.join(path, "models", "model.pt")
        self.parser = ConfigParser()
        self.parser.read_config(os.path.join(path, "configs", config))
        self.parser["bundle_root"] = path
        self._cache: tuple[Any, float, str] | None = None

    def _network(self, device: str, model_ts: float):
        if self._cache is None or self._cache[1:] != (model_ts, device):
            self.parser["device"] = device
            self.parser.parse()
            net = load_weights(self.parser.get_parsed_content("network_def"), self.model_path)
            net.output = "uncertainty"
            self._cache = (net.to(device).eval(), model_ts, device)
        return self._cache[0]

    def score(self, image: str, device: str = "cpu") -> dict[str, float]:
        """Every score of :data:`SCORES` of one image file, by name."""
        net = self._network(device, os.stat(self.model_path).st_mtime)
        data = self.parser.get_parsed_content("preprocessing")({"image": image})
        x = torch.as_tensor(data["image"])[None].to(device)
        with torch.no_grad():
            out = self.parser.get_parsed_content("inferer")(x, net)
        return {"expected_dice": expected_dice_error(out), "disagreement": disagreement_score(out, margin=self.margin)}

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        if not os.path.exists(self.model_path):
            logger.warning(f"no model at {self.model_path}: nothing scored")
            return {}
        start, device = time.time(), name_to_device(request.get("device"))
        model_ts = int(os.stat(self.model_path).st_mtime)
        images = datastore.get_unlabeled_images()
        todo = [i for i in images if datastore.get_image_info(i).get(TS_KEY) != model_ts]
        for image_id in todo:
            scores = self.score(datastore.get_image_uri(image_id), device)
            datastore.update_image_info(image_id, {**{SCORE_KEYS[k]: v for k, v in scores.items()}, TS_KEY: model_ts})
            logger.info(f"{image_id}: " + ", ".join(f"{k} {v:.5f}" for k, v in scores.items()))
        return {"total": len(images), "executed": len(todo), "latency": round(time.time() - start, 3)}


class DualSSLApp(MONAILabelApp):
    """The MONAI Label app of this bundle; ``--conf bundle <folder>`` picks the bundle (default: the
    folder the package was installed from), ``--conf strategy <name>`` the default "next image" strategy
    (:data:`DEFAULT_STRATEGY` otherwise): listed first, and taken by requests that name none.

    Raises:
        ValueError: ``strategy`` names no strategy of the app.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict):
        self.bundle = conf.get("bundle") or default_bundle()
        self.default_strategy = conf.get("strategy") or DEFAULT_STRATEGY
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai_dualssl",
            description="Dual-network uncertainty-guided semi-supervised 3D segmentation",
        )

    def init_infers(self):
        return {"dualssl": DualSSLInferTask(self.bundle, self.conf)}

    def init_trainers(self):
        return {"dualssl": DualSSLTrainTask(self.bundle, self.conf)}

    def init_scoring_methods(self):
        return {"dualssl": DualNetScoring(self.bundle)}

    def init_strategies(self):
        """A strategy per score of :data:`SCORES`, MONAI Label's ``random`` and ``first``; the default first
        (clients such as 3D Slicer offer the first one)."""
        strategies = {name: Epistemic(k=1, key=SCORE_KEYS[name], desc=desc) for name, desc in SCORES.items()}
        strategies.update(random=Random(), first=First())
        if self.default_strategy not in strategies:
            raise ValueError(f"--conf strategy {self.default_strategy!r}: expected one of {', '.join(strategies)}.")
        return {self.default_strategy: strategies.pop(self.default_strategy), **strategies}

    def next_sample(self, request: dict):
        """MONAI Label's "next sample" with this app's default strategy (``--conf strategy``, else
        :data:`DEFAULT_STRATEGY`) when the request names none; MONAI Label's own default is random."""
        return super().next_sample({**request, "strategy": request.get("strategy") or self.default_strategy})


if __name__ == "__main__":
    print(create_app(sys.argv[1] if len(sys.argv) > 1 else "dualssl_app"))
