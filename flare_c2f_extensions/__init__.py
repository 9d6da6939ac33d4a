"""The coarse-to-fine FLARE22 cascade as MONAI bundles: the code the bundles' configs reference, and the
``flare-c2f`` command.

One subpackage a concern:

- :mod:`.io`: reading CTs (NIfTI, DICOM) and writing label maps, masks, DICOM SEG, previews; file safety;
- :mod:`.transforms`: MONAI transforms of the stages (crops from a mask, resizing, largest component);
- :mod:`.cascade`: the network, the stages built from their bundles, the engines, the whole cascade and its
  MONAI inferer, assembling and exporting it;
- :mod:`.runs`: batches of CTs through the cascade (one batch runner), ``segment``, pseudo-labels, ranks;
- :mod:`.training`: training the stages through their bundles, resuming, self-training;
- :mod:`.evaluation`: FLARE22 DSC and NSD, per-organ quality signals;
- :mod:`.synthetic`: generated CTs with known organs, for the quickstart and the tests;
- :mod:`.releases`: published bundles and the sample CT, downloaded and verified;
- :mod:`.cli`: the command line and the quickstart.

Beside them: :mod:`.labels` (organ ids, groups, tolerances: the one source of truth), :mod:`.options` (the options
of a segmentation run), :mod:`.paths`, :mod:`.errors`, :mod:`.version`.

``flare_c2f_extensions.segment(image_or_path, ...)`` segments one CT (:func:`.runs.segment.segment`); importing the
package imports nothing else, so configs and commands load only what they use.
"""

from flare_c2f_extensions.version import __version__

__all__ = ["segment", "Segmenter", "__version__"]


def __getattr__(name: str):
    if name in ("segment", "Segmenter"):
        from flare_c2f_extensions.runs import segment

        return getattr(segment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
