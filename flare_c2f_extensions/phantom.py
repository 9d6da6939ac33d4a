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

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .labels import GROUPS, NUM_ORGANS, ORGANS, organ_id

__all__ = ["Case", "make_case", "write_cohort", "organ_centroids", "SPLITS"]

# Split name -> (images folder, labels folder, file prefix, seed domain). The unlabelled part's labels are its
# kept-aside truth, for scoring pseudo-labels only: a folder of its own that no training or inference reads.
SPLITS = {
    "Tr": ("imagesTr", "labelsTr", "FLARE22_Tr", 1),
    "Ts": ("imagesTs", "labelsTs", "FLARE22_Ts", 2),
    "Unlabelled": ("imagesUnlabelled", "truthUnlabelled", "FLARE22_Unlabelled", 3),
}

_SMALL = frozenset(GROUPS["small"])
_AIR = -1000.0
_HU_MIN, _HU_MAX = -1024, 3071
_MAX_SCAN_MM = 700.0  # longest cranio-caudal scan that drawn slice thicknesses produce

# Reference abdominal cavity half-sizes (mm) that organ positions are given for.
_REF_CX, _REF_CY = 135.0, 90.0


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


def _rotation(rx, ry, rz) -> np.ndarray:
    """Rotation matrix from angles in degrees (applied x, then y, then z)."""
    ax, ay, az = np.deg2rad([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


# ----------------------------------------------------------------------------------------------------
# shape primitives (anatomy parameters, all in reference patient mm)


@dataclass
class _Ellipsoid:
    center: np.ndarray
    semi: np.ndarray
    rot: np.ndarray
    harmonics: tuple = ()  # ((amplitude, w (3,), phase), ...) perturbation of the surface radius


@dataclass
class _Tube:
    points: np.ndarray  # (M, 3) control points
    radii: np.ndarray  # (M,)
    harmonics: tuple = ()  # ((amplitude, frequency, phase), ...) radius modulation along the tube


def _ellipsoid(rng, center, semi, rot=(0, 0, 0), scale=1.0, jitter=4.0, spin=5.0, bumps=0.06, nh=4):
    center = np.asarray(center, float) + rng.normal(0, jitter, 3)
    semi = np.asarray(semi, float) * scale * rng.uniform(0.94, 1.06, 3)
    rot = _rotation(*(np.asarray(rot, float) + rng.normal(0, spin, 3)))
    harmonics = []
    for _ in range(nh):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        harmonics.append((rng.uniform(0.3, 1.0) * bumps, direction * rng.uniform(1.5, 3.5), rng.uniform(0, 2 * np.pi)))
    return _Ellipsoid(center, semi, rot, tuple(harmonics))


def _tube(rng, points, radii, scale=1.0, jitter=3.0, bumps=0.08, nh=3, keep_ends=False):
    points = np.asarray(points, float).copy()
    noise = rng.normal(0, jitter, points.shape)
    if keep_ends:
        noise[[0, -1]] = 0
    points += noise
    radii = np.asarray(radii, float) * scale * rng.uniform(0.95, 1.05, len(radii))
    harmonics = tuple(
        (rng.uniform(0.3, 1.0) * bumps, rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)) for _ in range(nh)
    )
    return _Tube(points, radii, harmonics)


def _densify(tube: _Tube, step=6.0):
    """Smooth centreline (cubic spline through the control points) sampled about every ``step`` mm."""
    from scipy.interpolate import CubicSpline

    pts = tube.points
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    keep = np.concatenate([[True], seg > 1e-6])
    pts, radii = pts[keep], tube.radii[keep]
    if len(pts) < 2:
        return pts, radii
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    length = s[-1]
    m = int(np.clip(math.ceil(length / step), 2, 80)) + 1
    t = np.linspace(0, length, m)
    if len(pts) >= 3:
        dense = CubicSpline(s, pts, bc_type="natural")(t)
    else:
        dense = pts[0] + (pts[1] - pts[0]) * (t / length)[:, None]
    r = np.interp(t, s, radii)
    u = t / max(length, 1e-6)
    mod = np.ones_like(u)
    for amp, freq, phase in tube.harmonics:
        mod += amp * np.sin(2 * np.pi * freq * u + phase)
    return dense, r * np.clip(mod, 0.5, 1.5)


# ----------------------------------------------------------------------------------------------------
# anatomy of one patient (reference mm); independent of the voxel grid


def _organ_scales(rng, organ_scale):
    scales = {label: float(rng.uniform(0.85, 1.15)) for label in ORGANS}
    if organ_scale is None:
        return scales
    if isinstance(organ_scale, dict):
        for key, value in organ_scale.items():
            scales[organ_id(key)] = float(value)
        return scales
    return {label: float(organ_scale) for label in ORGANS}


def _anatomy(rng: np.random.Generator, organ_scale=None) -> dict:
    """Draw one patient: body habitus, intensities and every structure, in reference patient mm."""
    a = {}
    a["patient_scale"] = float(rng.uniform(0.85, 1.15))
    cx, cy = _REF_CX * rng.uniform(0.92, 1.08), _REF_CY * rng.uniform(0.9, 1.1)
    muscle, fat = rng.uniform(8, 14), rng.uniform(10, 35)
    a.update(cavity=(cx, cy), body=(cx + muscle + fat, cy + muscle + fat), wall=(cx + muscle, cy + muscle))
    fx, fy = cx / _REF_CX, cy / _REF_CY
    g = 0.5 * (fx + fy)
    scales = _organ_scales(rng, organ_scale)
    a["organ_scale"] = scales

    def p(x, y, z):  # reference position -> this patient's position
        return (x * fx, y * fy, z)

    def pts(points):
        return [p(*q) for q in points]

    hu = {
        "fat": rng.uniform(-115, -90),
        "mesentery": rng.uniform(-100, -70),
        "muscle": rng.uniform(40, 60),
        "cancellous": rng.uniform(350, 480),
        "cortical": rng.uniform(750, 1000),
        "disc": rng.uniform(70, 100),
        "csf": rng.uniform(5, 20),
        "lung": rng.uniform(-880, -800),
        "table": rng.uniform(-300, 200),
        "portal": rng.uniform(120, 200),
        "artery": rng.uniform(160, 260),
        "liver": rng.uniform(50, 75),
        "spleen": rng.uniform(40, 60),
        "cortex": rng.uniform(140, 190),
        "medulla": rng.uniform(90, 130),
        "pancreas": rng.uniform(30, 55),
        "gut_wall": rng.uniform(30, 55),
        "gut_fluid": rng.uniform(0, 25),
        "bile": rng.uniform(0, 20),
        "adrenal": rng.uniform(20, 40),
        "esophagus": rng.uniform(30, 50),
        "aorta": rng.uniform(160, 220),
        "ivc": rng.uniform(130, 190),
        "heart": rng.uniform(35, 50),
    }
    a["hu"] = hu
    a["noise_sd"] = float(rng.uniform(6, 20))
    a["blur"] = float(rng.uniform(0.35, 0.8))

    # spine: vertebral body centre, period of vertebra + disc (mm), phase
    a["spine"] = dict(
        y=-0.5 * cy,
        r=19 * g * rng.uniform(0.9, 1.1),
        period=rng.uniform(28, 34),
        disc=rng.uniform(5, 8),
        phase=rng.uniform(0, 40),
    )

    s = scales
    o = {}  # label -> list of (primitive, hu spec)
    bg = []  # background (label 0) structures: (primitive, hu spec, cavity_only)
    muscle_hu, lung_hu = ("solid", "muscle"), ("solid", "lung")
    vein_hu, artery_hu = ("solid", "portal"), ("solid", "artery")
    bone_hu = ("shell", "cortical", "cancellous", 0.25)

    def add(prim, spec, cavity_only=True):
        bg.append((prim, spec, cavity_only))

    def tube(points, radii, **kw):  # points in reference mm, radii before the habitus factor g
        return _tube(rng, pts(points), np.asarray(radii, float) * g, **kw)

    def ellipsoid(center, semi, **kw):
        return _ellipsoid(rng, p(*center), np.asarray(semi, float) * g, **kw)

    # --- background -------------------------------------------------------------------------------
    for side in (1, -1):
        psoas = [(side * 28, -38, 45), (side * 34, -40, -20), (side * 45, -35, -110), (side * 55, -20, -200)]
        add(tube(psoas, [5, 14, 22, 24]), muscle_hu)  # thin under the diaphragm, thick in the pelvis
        add(ellipsoid((side * 80, -25, 230), (70, 72, 135)), lung_hu)
        add(ellipsoid((side * 95, -35, -175), (10, 60, 55), rot=(0, 0, side * 25)), bone_hu)  # iliac wing
        renal_vein = [(side * 62, -36, -5 - 8 * (side > 0)), (side * 35, -20, -2), (22, -8, 2)]
        add(tube(renal_vein, [6, 5.5, 6]), vein_hu)  # the left one crosses in front of the aorta
        add(tube([(-8, -8, -85), (side * 30, -10, -140), (side * 55, -5, -210)], [7, 6, 6]), artery_hu)
        add(tube([(20, -12, -85), (side * 32 + 8, -22, -140), (side * 60, -15, -210)], [8, 7, 7]), vein_hu)
    add(ellipsoid((-15, 35, 205), (62, 48, 55), rot=(0, 20, -30)), ("solid", "heart"))
    add(ellipsoid((-15, 35, 205), (40, 30, 35), rot=(0, 20, -30)), artery_hu)  # heart chambers
    splenic_portal = [(-80, -25, 22), (-45, -8, 12), (-10, 0, 2), (12, 8, 2), (35, 12, 25)]
    add(tube(splenic_portal, [5, 5, 6, 8, 8]), vein_hu)
    add(tube([(10, 12, 0), (8, 25, -40), (5, 35, -100)], [7, 6, 5]), vein_hu)  # superior mesenteric vein
    add(tube([(-12, -14, 5), (-8, 8, -10), (-6, 25, -45), (-4, 35, -100)], [4, 4.5, 4, 3.5]), artery_hu)  # SMA
    colon = [
        (100, 10, -150),
        (102, 12, -60),
        (92, 30, -30),
        (50, 60, -48),
        (0, 66, -52),
        (-50, 58, -45),
        (-95, 25, -15),
        (-102, 5, -70),
        (-95, 0, -150),
    ]  # ascending, transverse, descending
    add(tube(colon, [24] * len(colon), jitter=5), ("hollow", 3.0 * g, rng.uniform(0.0, 0.6)))
    walk = [np.array(p(rng.uniform(-30, 30), rng.uniform(15, 45), -75.0))]  # small bowel loops
    for _ in range(int(rng.integers(8, 14))):
        step = rng.normal(0, 1, 3) * np.array([35 * fx, 20 * fy, 20])
        walk.append(np.clip(walk[-1] + step, [-75 * fx, 0, -190], [75 * fx, 60 * fy, -70]))
    add(_tube(rng, walk, [12 * g] * len(walk), jitter=0), ("hollow", 2.0 * g, rng.uniform(0.5, 1.0)))
    rib_top, rib_step = rng.uniform(170, 200), rng.uniform(24, 30)
    for k in range(8):  # ribs: from beside the spine round to the front, descending anteriorly
        angles = np.deg2rad(np.linspace(-75, 45 - 5 * k, 7))
        for side in (1, -1):
            rib = [
                (
                    side * (cx + 0.4 * muscle) * np.cos(t) * 0.97,
                    (cy + 0.4 * muscle) * np.sin(t) * 0.97,
                    rib_top - k * rib_step - 36 * (np.sin(t) + 1),
                )
                for t in angles
            ]
            add(_tube(rng, rib, [5 * g] * 7, jitter=1.5, bumps=0.02), ("shell", "cortical", "cancellous", 0.35), False)

    # --- organs (paint order, a["order"], decides where they touch) ------------------------------
    o[1] = [
        (ellipsoid((62, 0, 52), (68, 78, 72), rot=(0, -10, 10), scale=s[1], bumps=0.08), ("solid", "liver")),
        (ellipsoid((-20, 35, 70), (50, 32, 34), rot=(0, 15, 20), scale=s[1], bumps=0.08), ("solid", "liver")),
    ]
    liver_vessels = []  # intrahepatic vessels: liver label, vessel HU
    for _ in range(3):
        hilum = np.array(p(28, 8, 35))
        end = np.array(p(62, 0, 52)) + rng.normal(0, 40 * g, 3)
        liver_vessels.append(_tube(rng, [hilum, (hilum + end) / 2, end], [6 * g, 4.5 * g, 3 * g]))
    o[3] = [(ellipsoid((-95, -42, 50), (22, 42, 48), rot=(10, 0, -35), scale=s[3]), ("solid", "spleen"))]
    stomach = [(-52, -5, 82), (-62, 10, 58), (-55, 28, 30), (-35, 42, 8), (-8, 48, -2), (10, 45, 0), (20, 40, 0)]
    stomach = tube(stomach, [32, 32, 28, 24, 18, 14, 10], scale=s[11], jitter=4)  # fundus to pylorus
    o[11] = [(stomach, ("hollow", 4.0 * g, rng.uniform(0.1, 0.9)))]
    pancreas = [(28, 5, -22), (8, 12, -8), (-25, 10, 0), (-55, -10, 8), (-78, -22, 18)]  # head to tail
    o[4] = [(tube(pancreas, [15, 11, 11, 10, 9], scale=s[4], bumps=0.15, nh=5), ("solid", "pancreas"))]
    duodenum = [
        (20, 40, 0),
        (38, 28, -4),
        (52, 5, -12),
        (54, 0, -35),
        (48, 2, -55),
        (20, 8, -62),
        (-5, 8, -62),
        (-25, 8, -48),
        (-32, 12, -30),
    ]  # bulb, descending, horizontal, ascending parts
    duodenum = tube(duodenum, [10, 12, 11, 11, 11, 10, 10, 10, 9], scale=s[12], keep_ends=True)
    duodenum.points[0] = stomach.points[-1]  # continues from the pylorus
    o[12] = [(duodenum, ("hollow", 2.5 * g, rng.uniform(0.3, 1.0)))]
    o[2] = [(ellipsoid((68, -42, -12), (24, 22, 52), rot=(-12, -10, -20), scale=s[2]), ("kidney",))]
    o[13] = [(ellipsoid((-66, -40, -2), (24, 22, 52), rot=(-12, 10, 20), scale=s[13]), ("kidney",))]
    aorta = [(-15, -12, 260), (-14, -14, 100), (-12, -12, 0), (-8, -8, -80), (-8, -8, -90)]
    o[5] = [(tube(aorta, [12, 12, 11, 10, 9], scale=s[5], jitter=2, bumps=0.04), ("solid", "aorta"))]
    ivc = [(20, -12, -90), (22, -10, -40), (22, -12, 0), (25, -18, 60), (20, -10, 120), (10, 0, 160)]
    o[6] = [(tube(ivc, [10, 11, 12, 13, 14, 15], scale=s[6], jitter=2, bumps=0.06), ("solid", "ivc"))]
    gallbladder = ellipsoid((58, 40, 12), (12, 13, 28), rot=(35, -15, 0), scale=s[9], bumps=0.05)
    o[9] = [(gallbladder, ("gallbladder",))]
    cardia = (0, 0, 0)  # replaced by a point inside the fundus below
    esophagus = tube([(0, 10, 250), (-5, 10, 150), (-18, 8, 110), (-32, 4, 94), cardia], [9] * 5, scale=s[10], jitter=2)
    esophagus.points[-1] = stomach.points[0] + np.array([10 * fx, 3 * fy, 3])  # enters the stomach
    o[10] = [(esophagus, ("solid", "esophagus"))]
    for label, side, center in ((7, 1, (46, -34, 55)), (8, -1, (-40, -30, 52))):
        c = np.array(p(*center)) + rng.normal(0, 3, 3)
        limbs = []
        for k, sign in enumerate((1, -1)):  # inverted V in the coronal plane, one limb a bit posterior
            limb_center = c + np.array([sign * 5 * g, -3 * k * g, -6])
            rot = (0, -side * sign * 22, side * 15)
            limbs.append(
                _ellipsoid(rng, limb_center, np.array([3.2, 10, 17]) * g, rot=rot, scale=s[label], jitter=1, bumps=0.05)
            )
        o[label] = [(e, ("solid", "adrenal")) for e in limbs]
    a["organs"] = o
    a["order"] = (1, 3, 11, 4, 12, 2, 13, 5, 6, 9, 10, 7, 8)
    a["background"] = bg
    a["liver_vessels"] = liver_vessels
    a["kidney_medulla"] = float(rng.uniform(0.55, 0.7))
    return a


def _extent(prim) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounds of a primitive (reference mm), including its surface perturbation."""
    if isinstance(prim, _Ellipsoid):
        amp = 1 + sum(abs(h[0]) for h in prim.harmonics)
        half = np.sqrt(((prim.rot * prim.semi[None, :]) ** 2).sum(axis=1)) * amp
        return prim.center - half, prim.center + half
    dense, r = _densify(prim)
    return (dense - r[:, None]).min(axis=0), (dense + r[:, None]).max(axis=0)


# ----------------------------------------------------------------------------------------------------
# the voxel grid and painting


class _Canvas:
    """Canonical (RAS) arrays being painted, and the voxel <-> patient mapping."""

    def __init__(self, shape, spacing, origin, body_center, scale):
        self.shape = tuple(int(v) for v in shape)
        self.spacing = np.asarray(spacing, float)
        self.origin = np.asarray(origin, float)  # world position of voxel (0, 0, 0)
        self.center = np.asarray(body_center, float)  # world position of the patient frame origin
        self.scale = np.asarray(scale, float)  # patient mm -> world mm, per axis
        self.qstep = self.spacing / self.scale  # voxel size in patient mm
        self.label = np.zeros(self.shape, np.uint8, order="F")
        self.hu = np.full(self.shape, _AIR, np.float32, order="F")
        self.cavity = None

    def axis_q(self, axis, lo=0, hi=None):
        """Patient coordinates (float32) of the voxel centres lo..hi-1 along ``axis``."""
        hi = self.shape[axis] if hi is None else hi
        idx = np.arange(lo, hi, dtype=np.float64)
        q = (self.origin[axis] + idx * self.spacing[axis] - self.center[axis]) / self.scale[axis]
        return q.astype(np.float32)

    def box(self, lo_q, hi_q):
        """Index slices of the voxels inside patient-frame bounds (None when empty)."""
        lo_w = self.center + np.asarray(lo_q) * self.scale
        hi_w = self.center + np.asarray(hi_q) * self.scale
        lo_i = np.floor((lo_w - self.origin) / self.spacing).astype(int)
        hi_i = np.ceil((hi_w - self.origin) / self.spacing).astype(int) + 1
        lo_i = np.clip(lo_i, 0, self.shape)
        hi_i = np.clip(hi_i, 0, self.shape)
        if np.any(hi_i <= lo_i):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo_i, hi_i))

    def grids(self, box):
        qx = self.axis_q(0, box[0].start, box[0].stop)[:, None, None]
        qy = self.axis_q(1, box[1].start, box[1].stop)[None, :, None]
        qz = self.axis_q(2, box[2].start, box[2].stop)[None, None, :]
        return qx, qy, qz


def _floor_semi(prim: _Ellipsoid, canvas, min_vox):
    if not min_vox:
        return prim.semi
    vox = np.sqrt(((prim.rot * canvas.qstep[:, None]) ** 2).sum(axis=0))  # voxel size along each shape axis
    return np.maximum(prim.semi, min_vox * vox)


def _eval_ellipsoid(prim: _Ellipsoid, canvas, min_vox=0.0):
    """(box, rho, None): rho = normalised radius, < 1 inside the perturbed surface, inf far outside."""
    semi = _floor_semi(prim, canvas, min_vox)
    prim = _Ellipsoid(prim.center, semi, prim.rot, prim.harmonics)
    lo, hi = _extent(prim)
    box = canvas.box(lo, hi)
    if box is None:
        return None
    qx, qy, qz = canvas.grids(box)
    c = prim.center.astype(np.float32)
    dx, dy, dz = qx - c[0], qy - c[1], qz - c[2]
    r = prim.rot.astype(np.float32)
    u = [(r[0, k] * dx + r[1, k] * dy + r[2, k] * dz) / np.float32(semi[k]) for k in range(3)]
    n2 = u[0] * u[0] + u[1] * u[1] + u[2] * u[2]
    amp = sum(abs(h[0]) for h in prim.harmonics)
    cand = n2 < np.float32((1 + amp) ** 2)
    rho = np.full(n2.shape, np.inf, np.float32)
    if cand.any():
        uc = [v[cand] for v in u]
        eps = np.zeros(uc[0].shape, np.float32)
        for a_, w, ph in prim.harmonics:
            eps += np.float32(a_) * np.sin(
                np.float32(w[0]) * uc[0] + np.float32(w[1]) * uc[1] + np.float32(w[2]) * uc[2] + np.float32(ph)
            )
        rho[cand] = np.sqrt(n2[cand]) / (1 + eps)
    return box, rho, None


def _eval_tube(prim: _Tube, canvas, min_vox=0.0):
    """(box, rho, (radius, centreline y)) of a tube of varying radius around a smooth centreline."""
    dense, radii = _densify(prim)
    if min_vox:
        d = np.diff(dense, axis=0)
        d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
        perp = canvas.qstep[None, :] * np.sqrt(np.clip(1 - d**2, 0, 1))
        floor = min_vox * perp.max(axis=1)
        floor = np.concatenate([floor[:1], np.maximum(floor[:-1], floor[1:]), floor[-1:]])
        radii = np.maximum(radii, floor)
    lo = (dense - radii[:, None]).min(axis=0)
    hi = (dense + radii[:, None]).max(axis=0)
    box = canvas.box(lo, hi)
    if box is None:
        return None
    shape = tuple(s.stop - s.start for s in box)
    rho = np.full(shape, np.inf, np.float32)
    rad = np.zeros(shape, np.float32)
    cyl = np.zeros(shape, np.float32)
    for i in range(len(dense) - 1):
        p0, p1, r0, r1 = dense[i], dense[i + 1], radii[i], radii[i + 1]
        rmax = max(r0, r1)
        sub = canvas.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
        if sub is None:
            continue
        sub = tuple(slice(max(s.start, b.start), min(s.stop, b.stop)) for s, b in zip(sub, box))
        if any(s.stop <= s.start for s in sub):
            continue
        local = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sub, box))
        qx, qy, qz = canvas.grids(sub)
        d = (p1 - p0).astype(np.float32)
        wx, wy, wz = qx - np.float32(p0[0]), qy - np.float32(p0[1]), qz - np.float32(p0[2])
        t = (wx * d[0] + wy * d[1] + wz * d[2]) / np.float32(max(float(d @ d), 1e-9))
        np.clip(t, 0, 1, out=t)
        ex, ey, ez = wx - t * d[0], wy - t * d[1], wz - t * d[2]
        rr = np.float32(r0) + t * np.float32(r1 - r0)
        seg_rho = np.sqrt(ex * ex + ey * ey + ez * ez) / rr
        better = seg_rho < rho[local]
        rho[local] = np.where(better, seg_rho, rho[local])
        rad[local] = np.where(better, rr, rad[local])
        cyl[local] = np.where(better, np.float32(p0[1]) + t * d[1], cyl[local])
    return box, rho, (rad, cyl)


def _hu_values(spec, hu, rho, extra, qy, a):
    """HU of the selected voxels of a structure, given its spec."""
    kind = spec[0]
    if kind == "solid":
        return np.full(rho.shape, hu[spec[1]], np.float32)
    if kind == "kidney":
        return np.where(rho < a["kidney_medulla"], hu["medulla"], hu["cortex"]).astype(np.float32)
    if kind == "gallbladder":
        return np.where(rho < 0.85, hu["bile"], hu["gut_wall"]).astype(np.float32)
    if kind == "shell":  # bone: cortical rim, cancellous core
        _, rim, core, frac = spec
        return np.where(rho > 1 - frac, hu[rim], hu[core]).astype(np.float32)
    if kind == "hollow":  # wall, fluid lumen, air at the non-dependent (anterior) side
        _, wall, level = spec
        if extra is None:
            return np.full(rho.shape, hu["gut_wall"], np.float32)
        rad, cyl = extra
        dist = rho * rad
        lumen = dist < rad - wall
        air = lumen & ((qy - cyl) > level * rad)
        out = np.where(lumen, hu["gut_fluid"], hu["gut_wall"]).astype(np.float32)
        out[air] = _AIR
        return out
    raise ValueError(kind)


def _paint(canvas, prim, spec, a, label=0, min_vox=0.0, cavity_only=True, inside_label=None):
    ev = (_eval_ellipsoid if isinstance(prim, _Ellipsoid) else _eval_tube)(prim, canvas, min_vox)
    if ev is None:
        return
    box, rho, extra = ev
    sel = rho < 1
    if cavity_only:
        sel &= canvas.cavity[box[0], box[1], None]
    if inside_label is not None:
        sel &= canvas.label[box] == inside_label
    if not sel.any():
        return
    qy = None
    if extra is not None:
        qy = np.broadcast_to(canvas.axis_q(1, box[1].start, box[1].stop)[None, :, None], sel.shape)[sel]
        extra = tuple(e[sel] for e in extra)
    values = _hu_values(spec, a["hu"], rho[sel], extra, qy, a)
    canvas.hu[box][sel] = values
    if label:
        canvas.label[box][sel] = label


def _paint_background_slices(canvas, a):
    """Body, wall, mesenteric fat, paraspinal muscles, table and spine: 2D templates copied per slice."""
    hu = a["hu"]
    qx = canvas.axis_q(0)[:, None]
    qy = canvas.axis_q(1)[None, :]
    bx, by = a["body"]
    wx, wy = a["wall"]
    cx, cy = a["cavity"]
    tmpl = np.full((canvas.shape[0], canvas.shape[1]), _AIR, np.float32)
    table_y = -by - 8.0
    tmpl[(qy < table_y) & (qy > table_y - 14) & (np.abs(qx) < 0.7 * bx)] = hu["table"]
    body = (qx / bx) ** 2 + (qy / by) ** 2 < 1
    tmpl[body] = hu["fat"]
    tmpl[(qx / wx) ** 2 + (qy / wy) ** 2 < 1] = hu["muscle"]
    cavity = (qx / cx) ** 2 + (qy / cy) ** 2 < 1
    tmpl[cavity] = hu["mesentery"]
    sp = a["spine"]
    g = sp["r"] / 19.0
    for side in (1, -1):  # paraspinal muscles, within the body outline
        erector = ((qx - side * 32 * g) / (24 * g)) ** 2 + ((qy - (sp["y"] - 45 * g)) / (20 * g)) ** 2 < 1
        tmpl[erector & body] = hu["muscle"]
    canvas.cavity = cavity
    # spine variants: vertebra and disc
    r_body = np.hypot(qx, qy - sp["y"])
    canal_y = sp["y"] - sp["r"] - 10 * g
    r_canal = np.hypot(qx, qy - canal_y)
    vert, disc = tmpl.copy(), tmpl.copy()
    arch = (r_canal < 14 * g) | ((qx / (5 * g)) ** 2 + ((qy - (canal_y - 20 * g)) / (13 * g)) ** 2 < 1)
    arch |= ((np.abs(qx) - 26 * g) / (15 * g)) ** 2 + ((qy - canal_y) / (5 * g)) ** 2 < 1
    vert[arch] = hu["cortical"] * 0.8
    vert[r_body < sp["r"]] = hu["cortical"]
    vert[r_body < sp["r"] - 2.5 * g] = hu["cancellous"]
    disc[r_canal < 14 * g] = hu["muscle"]
    disc[r_body < sp["r"]] = hu["disc"]
    vert[r_canal < 8 * g] = hu["csf"]
    disc[r_canal < 8 * g] = hu["csf"]
    qz = canvas.axis_q(2)
    frac = np.mod((qz - sp["phase"]) / sp["period"], 1.0)
    is_disc = frac < sp["disc"] / sp["period"]
    for k in range(canvas.shape[2]):
        canvas.hu[:, :, k] = disc if is_disc[k] else vert


def _finish(canvas, rng, noise_sd, blur, chunk=16):
    """In-plane partial-volume blur, Gaussian noise, rounding to int16; chunked along the slices."""
    from scipy import ndimage

    out = np.empty(canvas.shape, np.int16, order="F")
    for k0 in range(0, canvas.shape[2], chunk):
        k1 = min(k0 + chunk, canvas.shape[2])
        block = canvas.hu[:, :, k0:k1]
        if blur > 0:
            block = ndimage.gaussian_filter1d(block, blur, axis=0, mode="nearest")
            ndimage.gaussian_filter1d(block, blur, axis=1, mode="nearest", output=block)
        else:
            block = block.copy()
        block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(noise_sd)
        np.rint(block, out=block)
        np.clip(block, _HU_MIN, _HU_MAX, out=block)
        out[:, :, k0:k1] = block
    return out


# ----------------------------------------------------------------------------------------------------
# public API


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

    # slice thickness: a clinical value, keeping the scan under ~70 cm long (300 slices -> 1 to 2 mm)
    thickness = [v for v in (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0) if v * shape[2] <= _MAX_SCAN_MM] or [1.0]
    drawn_spacing = (float(np.round(geo.uniform(0.6, 1.0), 4)),) * 2 + (float(geo.choice(thickness)),)
    spacing = drawn_spacing if spacing is None else _as_triple(spacing, float, "spacing")
    if min(spacing) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
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
    block_lo, block_hi = np.inf, -np.inf
    for label, parts in anatomy["organs"].items():
        if label in (5, 6, 10):
            continue
        for prim, _ in parts:
            lo, hi = _extent(prim)
            block_lo, block_hi = min(block_lo, lo[2]), max(block_hi, hi[2])
    block_lo, block_hi = block_lo - 5.0, block_hi + 5.0
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
    _paint_background_slices(canvas, anatomy)
    for prim, spec, cavity_only in anatomy["background"]:
        _paint(canvas, prim, spec, anatomy, cavity_only=cavity_only)
    for label in anatomy["order"]:
        min_vox = 2.5 if label in _SMALL else 1.0
        for prim, spec in anatomy["organs"][label]:
            _paint(canvas, prim, spec, anatomy, label=label, min_vox=min_vox, cavity_only=label not in _SMALL)
        if label == 1:
            for vessel in anatomy["liver_vessels"]:
                _paint(canvas, vessel, ("solid", "portal"), anatomy, inside_label=1)
    _ensure_present(canvas, anatomy)

    image = _finish(canvas, np.random.default_rng(noise_ss), anatomy["noise_sd"], anatomy["blur"])
    label = canvas.label
    affine = np.eye(4)
    affine[:3, :3] = np.diag(sp)
    affine[:3, 3] = origin
    image, label, affine = _reorient(image, label, affine, code)
    counts = _label_counts(label)
    info = dict(
        seed=int(seed),
        shape=tuple(int(v) for v in image.shape),
        spacing=tuple(float(v) for v in sp),
        orientation=code,
        patient_scale=(float(s_in), float(s_in), float(s_z)),
        organ_scale={ORGANS[k]: round(v, 4) for k, v in anatomy["organ_scale"].items()},
        noise_sd=anatomy["noise_sd"],
        voxels={ORGANS[k]: int(counts[k]) for k in ORGANS},
    )
    return Case(image=image, label=label, affine=affine, info=info)


def _label_counts(label, chunk=8):
    """Voxels per label id (0..13), slab by slab along the last axis to keep temporaries small."""
    counts = np.zeros(NUM_ORGANS + 1, np.int64)
    for k0 in range(0, label.shape[2], chunk):
        slab = label[:, :, k0 : k0 + chunk].ravel(order="K")
        counts += np.bincount(slab, minlength=NUM_ORGANS + 1)[: NUM_ORGANS + 1]
    return counts


def _ensure_present(canvas, anatomy):
    """Give every organ that ended up without a voxel a small seed near its centre.

    Seeds (up to 27 voxels, fewer on tiny grids) take voxels from the background or from organs with
    voxels to spare, so a seed never removes another organ: any grid of at least 14 voxels ends up
    holding all 13 organs.
    """
    counts = _label_counts(canvas.label)
    seed_voxels = int(np.clip(canvas.label.size // 50, 1, 27))
    shape = np.array(canvas.shape)
    for label, parts in anatomy["organs"].items():
        if counts[label]:
            continue
        prim, spec = parts[0]
        c = prim.center if isinstance(prim, _Ellipsoid) else _densify(prim)[0][len(_densify(prim)[0]) // 2]
        world = canvas.center + c * canvas.scale
        center = np.clip(np.rint((world - canvas.origin) / canvas.spacing).astype(int), 0, shape - 1)
        for radius in (1, 2, 4, 8, 16, 32, 64, int(shape.max())):
            box = tuple(slice(max(int(i) - radius, 0), int(i) + radius + 1) for i in center)
            ok = (canvas.label[box] == 0) | (counts[canvas.label[box]] > 1)
            if ok.sum() >= seed_voxels or radius >= shape.max():
                break
        idx = np.argwhere(ok) + np.array([b.start for b in box])
        dist = (((idx - center) * canvas.spacing) ** 2).sum(axis=1)
        taken = 0
        for k in np.argsort(dist, kind="stable"):
            voxel = tuple(idx[k])
            donor = canvas.label[voxel]
            if donor and counts[donor] <= 1:
                continue
            counts[donor] -= 1
            counts[label] += 1
            canvas.label[voxel] = label
            canvas.hu[voxel] = _base_hu(spec, anatomy["hu"])
            taken += 1
            if taken >= seed_voxels:
                break


def _base_hu(spec, hu):
    kind = spec[0]
    if kind in ("solid",):
        return hu[spec[1]]
    return {"kidney": hu["cortex"], "gallbladder": hu["bile"], "hollow": hu["gut_wall"]}.get(kind, hu["muscle"])


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
