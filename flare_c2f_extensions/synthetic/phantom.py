"""Synthetic abdominal CT cohorts in the FLARE22 layout, with known ground truth.

A case is a CT-like volume (int16 HU) and its label map (uint8 FLARE22 ids, :mod:`.labels`) that hold
all 13 FLARE22 organs in anatomical arrangement, plus background anatomy (air, table, subcutaneous fat,
abdominal wall muscle, mesenteric fat, spine, ribs, psoas and paraspinal muscles, lung bases, heart,
colon and small bowel, iliac bones and the main non-labelled vessels).

Coordinates
-----------
Anatomy is defined in a *patient frame* in millimetres of a reference adult: ``x`` towards the patient's
Right, ``y`` Anterior, ``z`` Superior (RAS+, the NIfTI / nibabel world convention, in which ``+x`` is the
patient's right), ``z = 0`` roughly at the level of the pancreas. The affine of every case maps voxel
indices to that RAS+ world, so ``nibabel.aff2axcodes`` of a case made with ``orientation="LPS"`` is
``("L", "P", "S")`` and the stored array is the RAS array flipped on its first two axes.

Field of view and patient scale
-------------------------------
The patient frame is mapped to the world by per-axis scales ``(s_in, s_in, s_z)`` and an offset:

* in-plane, ``s_in = min(patient_scale, fill * FOV / body size)``: a random adult size (0.85 to 1.15 of
  the reference) unless the body would not fit the in-plane field of view, in which case the whole
  patient shrinks so that the body fills a random 86 % to 97 % of it. Clinical grids (512 x 512 at
  0.6 to 1 mm) give near-physical sizes; tiny test grids (48 x 48 at 0.8 mm) give a miniature patient
  that still holds every organ.
* cranio-caudally, ``s_z`` is ``s_in`` times a small random aspect, clamped so that the block of
  abdominal organs (liver dome to the lowest kidney pole / duodenum) covers at least
  ``min(60 % of the slices, 40 slices)`` and at most a random 80 % to 95 % of the slices. The block sits
  at a random cranio-caudal offset inside the field of view; everything outside it is still body
  (thorax above, lower abdomen and pelvis below). The field of view therefore varies in extent and
  offset from case to case, yet never cuts an organ away.

Small organs (adrenal glands, gallbladder, esophagus) have their semi-axes / radii floored at 2.5 voxels
(the other organs at one voxel) in the case's own grid, so they stay visible at tiny sizes (about 50 to
150 voxels each at 48 x 48 x 32, 100 to 400 at 96 x 96 x 64, thousands at clinical sizes); an organ that
would still have no voxel gets a small seed near its centre, so any grid of at least 14 voxels holds all
13 organs.

Orientation: arrays are drawn in RAS and stored in the requested axis codes by flipping axes (codes keep
the x, y, z axis order: ``RAS``, ``LPS``, ``LAS``, ``RPI``...); the affine changes with them, so every
orientation of one seed describes the same physical anatomy.

Everything random is drawn from ``numpy.random.SeedSequence(seed)`` streams: anatomy (independent of the
grid), grid geometry (spacing, field of view) and noise. The same seed gives identical arrays and affines.
Volumes are built in float32 / int16 and only inside each structure's bounding box; a 512 x 512 x 300
case takes a few seconds on one core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flare_c2f_extensions.labels import ORGANS
from flare_c2f_extensions.synthetic.anatomy import _anatomy, _extent
from flare_c2f_extensions.synthetic.painting import _Canvas, _finish, _label_counts, _paint_anatomy

__all__ = ["Case", "make_case", "write_cohort", "organ_centroids", "SPLITS"]

# Split name -> (images folder, labels folder, file prefix, seed domain). The unlabelled part's labels are its
# kept-aside truth, for scoring pseudo-labels only: a folder of its own that no training or inference reads.
SPLITS = {
    "Tr": ("imagesTr", "labelsTr", "FLARE22_Tr", 1),
    "Ts": ("imagesTs", "labelsTs", "FLARE22_Ts", 2),
    "Unlabelled": ("imagesUnlabelled", "truthUnlabelled", "FLARE22_Unlabelled", 3),
}

_MAX_SCAN_MM = 700.0  # longest cranio-caudal scan that drawn slice thicknesses produce


@dataclass
class Case:
    """One synthetic case.

    ``image``: int16 HU, ``label``: uint8 FLARE22 ids 0..13 (same shape), both with array axes as stored
    in the file; ``affine``: 4x4 float64 voxel -> RAS+ world (mm); ``info``: how the case was drawn
    (seed, spacing, orientation, scales, organ scales, noise).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the stored array axes."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


# ----------------------------------------------------------------------------------------------------
# small helpers


def _as_triple(value, cast, name):
    """Parse ``96,96,64`` / ``(96, 96, 64)`` / a scalar (for spacing) into a 3-tuple."""
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").replace(" ", ",").split(",") if v]
    if np.isscalar(value):
        value = [value] * 3
    value = tuple(cast(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} needs 3 values, got {value!r}")
    return value


def _orientation_code(orientation) -> str:
    code = "".join(orientation).upper() if not isinstance(orientation, str) else orientation.upper()
    if len(code) != 3 or code[0] not in "RL" or code[1] not in "AP" or code[2] not in "SI":
        raise ValueError(
            f"orientation {orientation!r}: use a 3-letter code with the axes in x, y, z order "
            "(first R/L, second A/P, third S/I), e.g. 'RAS', 'LPS', 'LAS', 'RPI'"
        )
    return code


# ----------------------------------------------------------------------------------------------------
# public API


def _draw_spacing(geo, shape, spacing):
    """Voxel size: given, or a drawn clinical one keeping the scan under ~70 cm (300 slices -> 1 to 2 mm)."""
    thickness = [v for v in (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0) if v * shape[2] <= _MAX_SCAN_MM] or [1.0]
    drawn_spacing = (float(np.round(geo.uniform(0.6, 1.0), 4)),) * 2 + (float(geo.choice(thickness)),)
    spacing = drawn_spacing if spacing is None else _as_triple(spacing, float, "spacing")
    if min(spacing) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    return spacing


def _organ_block(anatomy):
    """Cranio-caudal extent (reference mm, 5 mm margin) of the abdominal organs (through-running tubes left out)."""
    block_lo, block_hi = np.inf, -np.inf
    for label, parts in anatomy["organs"].items():
        if label in (5, 6, 10):
            continue
        for prim, _ in parts:
            lo, hi = _extent(prim)
            block_lo, block_hi = min(block_lo, lo[2]), max(block_hi, hi[2])
    return block_lo - 5.0, block_hi + 5.0


def make_case(seed: int, shape=(96, 96, 64), spacing=None, orientation="RAS", organ_scale=None, fov=None) -> Case:
    """Generate one synthetic abdominal CT case with all 13 FLARE22 organs.

    Args:
        seed: everything random derives from it (anatomy, grid geometry, noise).
        shape: stored array shape, e.g. ``(512, 512, 300)`` or ``"48,48,32"``; axis 2 is the slice axis.
        spacing: voxel size in mm along the stored axes (3 values or one isotropic value); ``None`` draws
            in-plane 0.6 to 1.0 mm and a slice thickness from 1 to 5 mm (clinical values, only those that
            keep the scan under 70 cm: 300 slices get 1 to 2 mm).
        orientation: axis codes of the stored array, axes kept in x, y, z order (``"RAS"``, ``"LPS"``,
            ``"LAS"``, ``"RPI"``...). The same seed describes the same physical anatomy in every
            orientation: only the storage (array flips) and the affine differ.
        organ_scale: ``None`` draws a size factor per organ in [0.85, 1.15]; a number fixes it for every
            organ; a dict ``{organ name or id: factor}`` fixes those organs and draws the rest.
        fov: cranio-caudal placement. ``None`` draws it; a number in [0, 1] puts the organ block at that
            relative position in the free slices (0 inferior end, 1 superior end); a pair
            ``(position, fill)`` also fixes the largest fraction of slices the organ block may cover.

    See the module docstring for how the patient is scaled to the field of view.
    """
    shape = _as_triple(shape, int, "shape")
    if min(shape) < 1:
        raise ValueError(f"shape must be positive, got {shape}")
    code = _orientation_code(orientation)
    anat_ss, geo_ss, noise_ss = np.random.SeedSequence(int(seed)).spawn(3)
    anatomy = _anatomy(np.random.default_rng(anat_ss), organ_scale)
    geo = np.random.default_rng(geo_ss)

    spacing = _draw_spacing(geo, shape, spacing)
    # stored axis a is canonical axis a (orientations keep the axis order), so shape/spacing carry over
    n = np.array(shape, float)
    sp = np.array(spacing, float)
    fov_mm = n * sp

    # in-plane patient scale: physical unless the body would not fit the field of view
    bx, by = anatomy["body"]
    fill_xy = geo.uniform(0.86, 0.97)
    fit = fill_xy * min(fov_mm[0] / (2 * bx), fov_mm[1] / (2 * (by + 20)))  # +20: room for the table
    s_in = min(anatomy["patient_scale"], fit)
    # cranio-caudal: organ block of abdominal organs (tubes that run on through the FOV are left out)
    block_lo, block_hi = _organ_block(anatomy)
    length = block_hi - block_lo
    aspect = geo.uniform(0.93, 1.07)
    fill_z = geo.uniform(0.8, 0.95)
    position = geo.uniform(0, 1)
    if fov is not None:
        if np.isscalar(fov) or isinstance(fov, str):
            position = float(fov)
        else:
            position, fill_z = (float(v) for v in fov)
        if not (0 <= position <= 1 and 0 < fill_z <= 1):
            raise ValueError(f"fov: position in [0, 1] and fill in (0, 1], got {fov!r}")
    s_hi = fill_z * fov_mm[2] / length
    s_lo = min(min(0.6 * fov_mm[2], 40 * sp[2]) / length, s_hi)
    s_z = float(np.clip(s_in * aspect, s_lo, s_hi))
    scale = np.array([s_in, s_in, s_z])

    # world placement: field of view centred near the scanner axis, patient shifted inside it
    origin = np.array([-(n[0] - 1) / 2 * sp[0], -(n[1] - 1) / 2 * sp[1], geo.uniform(-700, -100)])
    origin[:2] += geo.uniform(-15, 15, 2)
    fov_center = origin + (n - 1) / 2 * sp
    slack = np.maximum(fov_mm[:2] / 2 - np.array([bx, by + 20]) * s_in, 0)
    center = np.empty(3)
    center[:2] = fov_center[:2] + geo.uniform(-0.5, 0.5, 2) * slack
    center[1] += 10 * s_in  # the table sits below the patient
    free = fov_mm[2] - length * s_z
    z_block_start = origin[2] - sp[2] / 2 + position * max(free, 0.0)
    center[2] = z_block_start - block_lo * s_z

    canvas = _Canvas(shape, sp, origin, center, scale)
    _paint_anatomy(canvas, anatomy)

    image = _finish(canvas, np.random.default_rng(noise_ss), anatomy["noise_sd"], anatomy["blur"])
    label = canvas.label
    affine = np.eye(4)
    affine[:3, :3] = np.diag(sp)
    affine[:3, 3] = origin
    image, label, affine = _reorient(image, label, affine, code)
    info = _case_info(seed, image, label, sp, code, (s_in, s_z), anatomy)
    return Case(image=image, label=label, affine=affine, info=info)


def _case_info(seed, image, label, sp, code, scales, anatomy) -> dict:
    """How a case was drawn: seed, stored geometry, patient and organ scales, noise, voxels per organ."""
    s_in, s_z = scales
    counts = _label_counts(label)
    return dict(
        seed=int(seed),
        shape=tuple(int(v) for v in image.shape),
        spacing=tuple(float(v) for v in sp),
        orientation=code,
        patient_scale=(float(s_in), float(s_in), float(s_z)),
        organ_scale={ORGANS[k]: round(v, 4) for k, v in anatomy["organ_scale"].items()},
        noise_sd=anatomy["noise_sd"],
        voxels={ORGANS[k]: int(counts[k]) for k in ORGANS},
    )


def _reorient(image, label, affine, code):
    """Store canonical RAS arrays in the orientation ``code`` (flips only), keeping the same world."""
    if code == "RAS":
        return image, label, affine
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(code))
    new_affine = affine @ inv_ornt_aff(transform, image.shape)
    image = np.asfortranarray(apply_orientation(image, transform))
    label = np.asfortranarray(apply_orientation(label, transform))
    return image, label, new_affine


def organ_centroids(case: Case) -> dict[int, np.ndarray]:
    """World (RAS+, mm) centroid of every organ present in ``case``, keyed by FLARE id."""
    out = {}
    for label in ORGANS:
        idx = np.argwhere(case.label == label)
        if len(idx):
            out[label] = case.affine[:3, :3] @ idx.mean(axis=0) + case.affine[:3, 3]
    return out


def _save(array, affine, path: Path, dtype):
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.header.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _case_seed(seed: int, split: str, index: int) -> int:
    domain = SPLITS[split][3]
    return int(np.random.SeedSequence([int(seed), domain, int(index)]).generate_state(1)[0])


def write_cohort(
    out,
    n=4,
    seed=0,
    shape=(96, 96, 64),
    n_test=0,
    spacing=None,
    orientations=("RAS", "LPS"),
    organ_scale=None,
    fov=None,
    start=1,
    verbose=False,
    n_unlabelled=0,
) -> dict:
    """Write a synthetic cohort in the FLARE22 layout and return the written paths.

    ``out/imagesTr/FLARE22_Tr_0001_0000.nii.gz`` + ``out/labelsTr/FLARE22_Tr_0001.nii.gz`` for cases
    ``start .. start + n - 1``, and ``imagesTs`` / ``labelsTs`` (``FLARE22_Ts_*``) for ``n_test`` held-out
    cases. ``n_unlabelled`` cases form FLARE22's unlabelled part: images only in ``imagesUnlabelled``
    (``FLARE22_Unlabelled_0001_0000.nii.gz``), their truth kept aside in ``truthUnlabelled`` for scoring
    pseudo-labels, never for training. Case ``i`` of a split depends only on ``(seed, split, i)`` (and the
    options), never on ``n``; the splits use different seeds. Orientations cycle over ``orientations`` by case
    number (a single code or ``"RAS,LPS"`` also work). Images are int16, labels uint8, both with the same
    affine in qform and sform (code 1); files are written to a temporary name and renamed into place.
    Other options go to :func:`make_case`.

    Returns ``{"imagesTr": [...], "labelsTr": [...], "imagesTs": [...], "labelsTs": [...], "imagesUnlabelled": [...],
    "truthUnlabelled": [...]}`` (str paths).
    """
    out = Path(out)
    if isinstance(orientations, str):
        orientations = [o for o in orientations.replace(" ", ",").split(",") if o]
    orientations = [_orientation_code(o) for o in orientations]
    if not orientations:
        raise ValueError("orientations is empty")
    shape = _as_triple(shape, int, "shape")
    result = {folder: [] for images_dir, labels_dir, _, _ in SPLITS.values() for folder in (images_dir, labels_dir)}
    for split, count in (("Tr", int(n)), ("Ts", int(n_test)), ("Unlabelled", int(n_unlabelled))):
        if count <= 0:
            continue
        images_dir, labels_dir, prefix, _ = SPLITS[split]
        (out / images_dir).mkdir(parents=True, exist_ok=True)
        (out / labels_dir).mkdir(parents=True, exist_ok=True)
        for i in range(int(start), int(start) + count):
            case = make_case(
                _case_seed(seed, split, i),
                shape=shape,
                spacing=spacing,
                orientation=orientations[(i - 1) % len(orientations)],
                organ_scale=organ_scale,
                fov=fov,
            )
            name = f"{prefix}_{i:04d}"
            image_path = out / images_dir / f"{name}_0000.nii.gz"
            label_path = out / labels_dir / f"{name}.nii.gz"
            _save(case.image, case.affine, image_path, np.int16)
            _save(case.label, case.affine, label_path, np.uint8)
            result[images_dir].append(str(image_path))
            result[labels_dir].append(str(label_path))
            if verbose:
                print(f"{name}: spacing {case.info['spacing']} {case.info['orientation']}", flush=True)
    return result
