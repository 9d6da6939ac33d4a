"""Extensions that the flare22_* MONAI bundles reference: labels, network, transforms, data, cascade, metrics."""

from . import data, labels, metrics, networks, transforms

__version__ = "0.1.0"
__all__ = ["data", "labels", "metrics", "networks", "transforms", "__version__"]
