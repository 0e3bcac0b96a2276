"""MONAI Label app of the bundle: ``monailabel start_server --app <this folder> --studies <images>``."""

from monai_dualssl.labelapp import DualSSLApp  # noqa: F401 (MONAI Label finds the app class here)
