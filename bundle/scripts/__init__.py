"""Uncertainty-guided dual-network semi-supervised 3D segmentation for MONAI.

Importing the package registers its components, so bundle configs name them by class name
(``_target_: CrossConsistencyLoss``) after ``imports: ["$import monai_dualssl"]``.

The public names of every module (its ``__all__``), by module; ``labelapp`` (the MONAI Label backend,
which needs ``monailabel``) is imported on its own.
"""

# configuration values and run folders
from .config import ConfigError, RunConfig, as_bool, check_config, check_run_folder, running_parser

# data: readers, datalists, the synthetic demo dataset, the checks before training and inference
from .readers import H5Reader, is_slice_pattern, slice_files
from .datalists import acdc_datalist, build_datalist, folder_datalist, la_datalist, msd_datalist, split_items
from .synthetic import make_synthetic_dataset
from .preflight import DataError, check_inputs, preflight, raise_failed_inputs, unlabeled_items

# model and training
from .networks import (
    MEMORY_FORMATS,
    DualNet,
    ResNetVNet,
    VNet,
    ensemble_uncertainty,
    resolve_memory_format,
    set_num_threads,
    stride_divisors,
)
from .losses import (
    CosineConsistencyLoss,
    CrossConsistencyLoss,
    EntropyFilteredCPSLoss,
    MutualCorrectionLoss,
    PrototypeContrastiveLoss,
    SupervisedLoss,
    sigmoid_rampup,
)
from .engines import DualSSLTrainer, LoaderStream, NonFiniteLossError, loss_terms, random_state, set_random_state
from .handlers import (
    AtomicCheckpointSaver,
    RampUpHandler,
    ResumeHandler,
    ValidationState,
    latest_checkpoint,
    non_finite_entries,
)

# inference and evaluation: inferers and uncertainty, metrics, the evaluation loop
from .inference import (
    MODEL_NAMES,
    SoftmaxOutput,
    disagreement_score,
    expected_dice_error,
    UNCERTAINTY_MAPS,
    uncertainty_score,
    fast_inferer,
    field_inferer,
    field_overlap,
    load_weights,
    model_variants,
    frozen_for_cpu,
    protocol_inferer,
)
from .metrics import (
    CLASS_MEAN,
    CLASS_MEAN_RULE,
    METRIC_KEYS,
    binary_metrics,
    class_mean_rows,
    keep_largest_component,
    segmentation_metrics,
    summarize,
    surface_distances,
    surface_voxels,
)
from .evaluation import evaluate

# class names, experiment tracking, figures
from .labels import BACKGROUND, class_names
from .tracking import configure_mlflow, export_config, run_params
from .visualize import montages_from_folder, plot_training_curves, save_montage

__version__ = "0.2.0"
