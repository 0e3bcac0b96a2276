"""Uncertainty-guided dual-network semi-supervised 3D segmentation for MONAI.

Importing the package registers its components, so bundle configs name them by class name
(``_target_: CrossConsistencyLoss``) after ``imports: ["$import monai_dualssl"]``.
"""

from .config import *  # noqa: F401,F403
from .data import *  # noqa: F401,F403
from .engines import *  # noqa: F401,F403
from .evaluation import *  # noqa: F401,F403
from .handlers import *  # noqa: F401,F403
from .labels import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .networks import *  # noqa: F401,F403
from .tracking import *  # noqa: F401,F403
from .visualize import *  # noqa: F401,F403

__version__ = "0.1.0"
