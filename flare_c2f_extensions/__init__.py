"""Extensions that the flare22_* MONAI bundles reference: labels, network, transforms, data, cascade, metrics."""

from . import labels

__version__ = "0.1.0"
__all__ = ["labels", "__version__"]
