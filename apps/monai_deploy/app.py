"""MONAI Deploy application of the FLARE22 coarse-to-fine cascade: a CT DICOM series in, a DICOM Segmentation of the
13 FLARE22 organs out.

    DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator (the first CT series) -> DICOMSeriesToVolumeOperator
    -> MonaiBundleInferenceOperator -> DICOMSegmentationWriterOperator

The inference operator runs the cascade bundle's TorchScript export (``model.ts``, made with ``monai.bundle
ckpt_export``; the bundle's configs travel inside it): its ``preprocessing``, ``inferer`` (``CascadeInferer``, every
stage) and ``postprocessing`` (``Invertd``), without the loader and the saver. The label map it hands on holds the
FLARE ids 1..13; the writer makes label value k segment k, so the segment descriptions follow the ids in order, named
and coded (SNOMED CT, with laterality for paired organs) from ``flare_c2f_extensions.labels``.
The SDK's SEG writer is adapted in a few lines (``SegWriterOperator``, see its docstring).

Run: ``python app.py -i DICOM_DIR -o OUT -m model.ts`` (or ``python apps/monai_deploy ...``; see README.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from highdicom.sr import CodedConcept
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Image, IOType
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.monai_bundle_inference_operator import IOMapping, MonaiBundleInferenceOperator
from pydicom.sr.coding import Code

from flare_c2f_extensions import __version__
from flare_c2f_extensions.io.dicom_seg import PATIENT_STUDY_TYPE2
from flare_c2f_extensions.labels import ORGANS, SNOMED_ANATOMICAL_STRUCTURE, SNOMED_CT, SNOMED_LATERALITY

CT_SERIES = {"selections": [{"name": "CT", "conditions": {"Modality": "(?i)CT"}}]}


class OrganDescription(SegmentDescription):
    """The segment of one FLARE organ (id ``organ``): its name, its SNOMED CT code and, for a paired organ, the
    laterality modifier (SegmentedPropertyTypeModifierCodeSequence), which the SDK's description has no argument for."""

    def __init__(self, organ: int):
        value, meaning, self.laterality = SNOMED_CT[organ]
        category_value, category_meaning = SNOMED_ANATOMICAL_STRUCTURE
        super().__init__(
            segment_label=ORGANS[organ],
            segmented_property_category=Code(category_value, "SCT", category_meaning),
            segmented_property_type=Code(value, "SCT", meaning),
            algorithm_name="flare-c2f",
            algorithm_version=__version__,
        )

    def to_segment_description(self, segment_number: int):
        description = super().to_segment_description(segment_number)
        if self.laterality is not None:
            value, meaning = SNOMED_LATERALITY[self.laterality]
            description.SegmentedPropertyTypeModifierCodeSequence = [CodedConcept(value, "SCT", meaning)]
        return description


class SegWriterOperator(DICOMSegmentationWriterOperator):
    """The SDK's SEG writer, first giving the source slices the Type 2 patient and study attributes a SEG copies
    (present, may be empty) where an anonymised series lacks them, as ``flare-c2f segment --dicom_seg`` does; only
    the in-memory datasets change, never the input files."""

    def create_dicom_seg(self, image, dicom_series, output_dir):
        for instance in dicom_series.get_sop_instances():
            dataset = instance.get_native_sop_instance()
            for keyword in PATIENT_STUDY_TYPE2:
                if keyword not in dataset:
                    setattr(dataset, keyword, "")
        super().create_dicom_seg(image, dicom_series, output_dir)


class FlareCascadeApp(Application):
    """CT series -> FLARE22 cascade -> DICOM SEG with one segment per organ (ids 1..13 = segments 1..13)."""

    name = "flare22_cascade_seg"
    description = "FLARE22 coarse-to-fine abdominal organ segmentation (13 organs) of a CT series, as DICOM SEG"
    version = __version__

    def compose(self):
        context: AppContext = Application.init_app_context(self.argv)
        logging.info(f"{context}")
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=Path(context.input_path),
                                         name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=json.dumps(CT_SERIES), name="series_selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        cascade = MonaiBundleInferenceOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=context,
            bundle_path=context.model_path,  # model.ts: the exported cascade, its configs inside
            name="cascade",
        )
        writer = SegWriterOperator(
            self,
            segment_descriptions=[OrganDescription(organ) for organ in sorted(ORGANS)],
            output_folder=Path(context.output_path),
            name="seg_writer",
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, cascade, {("image", "image")})
        self.add_flow(cascade, writer, {("pred", "seg_image")})
        self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    FlareCascadeApp().run()
