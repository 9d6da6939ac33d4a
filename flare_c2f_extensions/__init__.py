"""Extensions that the flare22_* MONAI bundles reference: labels, network, transforms, inputs and outputs, metrics.

``flare_c2f_extensions.segment(image_or_path, ...)`` segments one CT (see :func:`.segmenter.segment`); it is loaded on
first use, so importing the package stays as light as the bundles need.
"""

import gc as _gc

_collecting = _gc.isenabled()
_gc.disable()  # torch and MONAI create a great many objects on import: collecting meanwhile costs ~0.9 s a start
try:
    from . import discovery, errors, files, images, label_maps, labels, metrics, networks, transforms
finally:
    if _collecting:
        _gc.enable()

from .version import __version__  # noqa: E402

__all__ = [
    "discovery", "errors", "files", "images", "label_maps", "labels", "metrics", "networks", "transforms", "segment",
    "Segmenter", "__version__",
]

_LAZY = {"segment": "segment", "Segmenter": "Segmenter"}  # name -> attribute of .segmenter


def __getattr__(name: str):
    if name in _LAZY:
        from . import segmenter

        return getattr(segmenter, _LAZY[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
