"""FLARE22 label ids, organ names, cascade stage groups and NSD tolerances.

The one source of truth: configs and code read these names, nothing repeats them.
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = [
    "GROUPS", "NSD_TOLERANCE_MM", "NUM_CLASSES", "NUM_ORGANS", "ORGANS", "ORGAN_IDS", "REFINER_MIN_SIZE_MM",
    "SLAB_ORGANS", "SNOMED_ANATOMICAL_STRUCTURE", "SNOMED_CT", "SNOMED_LATERALITY",
    "label_names", "organ_id",
]

# FLARE22 label id -> organ name.
ORGANS = MappingProxyType(
    {
        1: "liver",
        2: "right_kidney",
        3: "spleen",
        4: "pancreas",
        5: "aorta",
        6: "inferior_vena_cava",
        7: "right_adrenal_gland",
        8: "left_adrenal_gland",
        9: "gallbladder",
        10: "esophagus",
        11: "stomach",
        12: "duodenum",
        13: "left_kidney",
    }
)
ORGAN_IDS = MappingProxyType({name: label for label, name in ORGANS.items()})
NUM_ORGANS = len(ORGANS)
NUM_CLASSES = NUM_ORGANS + 1  # background + organs

# Cascade stage groups (FLARE ids, in the order of the stage's local ids 1..k).
GROUPS = MappingProxyType(
    {
        "solid": (1, 2, 3, 13),
        "digestive": (4, 11, 12),
        "vessels": (5, 6),
        "small": (7, 8, 9, 10),
    }
)

# Normalised surface Dice tolerance per organ in millimetres (FLARE22 evaluation).
NSD_TOLERANCE_MM = MappingProxyType(
    {1: 5, 2: 3, 3: 3, 4: 5, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 3, 11: 5, 12: 7, 13: 3}
)

# Organs whose masks are cut to the ground truth's slice range on array axis 2 before scoring
# (FLARE22 evaluation: aorta, inferior vena cava, esophagus).
SLAB_ORGANS = (5, 6, 10)

# Small-organ refiner: minimum box size in millimetres per array axis after reorientation to RAS
# (left-right, posterior-anterior, inferior-superior), for FLARE ids 7..10 (``GROUPS["small"]``).
# A box smaller than this grows about the organ's centre (``CropFromMask(min_size_mm=...)``), so that the
# 64^3 crop always holds some surrounding anatomy, tolerates a located mask that is a few millimetres
# off or cut short, and never upsamples a tiny box to absurdly fine voxels (48 mm -> 0.375 mm).
# - adrenal glands (7, 8): Y/V-shaped glands with limbs of 2 to 5 cm and a body under 1 cm thick; 48 mm
#   holds a whole gland plus its neighbours (crus, kidney upper pole, IVC/aorta) in every direction.
# - gallbladder (9): 7 to 10 cm long and 3 to 4 cm wide when distended, only 2 to 3 cm when contracted;
#   64 mm keeps a contracted one in its liver-bed context, a distended one is larger anyway.
# - esophagus (10): a tube of about 2 to 2.5 cm diameter; 64 mm in-plane shows it with the aorta, crura
#   and spine around it; cranio-caudally it runs through the whole upper scan, so the minimum only
#   matters when just its last few centimetres (the gastro-oesophageal junction) are in the field of view.
REFINER_MIN_SIZE_MM = MappingProxyType(
    {
        7: (48.0, 48.0, 48.0),
        8: (48.0, 48.0, 48.0),
        9: (64.0, 64.0, 64.0),
        10: (64.0, 64.0, 64.0),
    }
)


def organ_id(name_or_id: str | int) -> int:
    """FLARE id of an organ given by name (``"gallbladder"``) or id (``9``)."""
    if isinstance(name_or_id, str) and not name_or_id.isdigit():
        if name_or_id not in ORGAN_IDS:
            raise KeyError(f"unknown organ {name_or_id!r}; known organs: {', '.join(ORGAN_IDS)}")
        return ORGAN_IDS[name_or_id]
    label = int(name_or_id)
    if label not in ORGANS:
        raise KeyError(f"{label} is not a FLARE22 organ id (1..{NUM_ORGANS})")
    return label


def label_names(labels: tuple[int, ...] | None = None) -> dict[str, str]:
    """Meaning of the values of a FLARE label map (MONAI ``channel_def`` form, keyed by FLARE id):
    ``{"0": "background", "1": "liver", ...}`` for ``labels`` (all organs by default)."""
    labels = tuple(ORGANS) if labels is None else tuple(sorted(labels))
    return {"0": "background", **{str(label): ORGANS[label] for label in labels}}


# SNOMED CT (scheme designator "SCT") code of each organ for DICOM Segmentation objects, as DICOM's CID 7154
# "Abdominal Segmentation Type" has them: (code value, code meaning, laterality or None). Paired organs are coded
# as the organ plus a laterality modifier (SegmentedPropertyTypeModifierCodeSequence), as DICOM does.
SNOMED_CT = MappingProxyType(
    {
        1: ("10200004", "Liver", None),
        2: ("64033007", "Kidney", "right"),
        3: ("78961009", "Spleen", None),
        4: ("15776009", "Pancreas", None),
        5: ("15825003", "Aorta", None),
        6: ("64131007", "Inferior vena cava", None),
        7: ("23451007", "Adrenal gland", "right"),
        8: ("23451007", "Adrenal gland", "left"),
        9: ("28231008", "Gallbladder", None),
        10: ("32849002", "Esophagus", None),
        11: ("69695003", "Stomach", None),
        12: ("38848004", "Duodenum", None),
        13: ("64033007", "Kidney", "left"),
    }
)
SNOMED_LATERALITY = MappingProxyType({"right": ("24028007", "Right"), "left": ("7771000", "Left")})
SNOMED_ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")  # the segments' property category
