"""Anatomy of one synthetic patient for the phantom: shape primitives and every structure, in reference mm."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flare_c2f_extensions.labels import ORGANS, organ_id

__all__ = []

# Reference abdominal cavity half-sizes (mm) that organ positions are given for.
_REF_CX, _REF_CY = 135.0, 90.0


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


class _Frame:
    """One patient's frame: reference mm -> this patient's mm, and primitives drawn from ``rng``."""

    def __init__(self, rng, cx, cy, muscle):
        self.rng, self.cx, self.cy, self.muscle = rng, cx, cy, muscle
        self.fx, self.fy = cx / _REF_CX, cy / _REF_CY
        self.g = 0.5 * (self.fx + self.fy)

    def p(self, x, y, z):  # reference position -> this patient's position
        return (x * self.fx, y * self.fy, z)

    def pts(self, points):
        return [self.p(*q) for q in points]

    def tube(self, points, radii, **kw):  # points in reference mm, radii before the habitus factor g
        return _tube(self.rng, self.pts(points), np.asarray(radii, float) * self.g, **kw)

    def ellipsoid(self, center, semi, **kw):
        return _ellipsoid(self.rng, self.p(*center), np.asarray(semi, float) * self.g, **kw)


def _habitus(rng: np.random.Generator, organ_scale=None) -> tuple[dict, _Frame]:
    """Body habitus, organ scales, intensities, noise and spine of one patient, and its frame."""
    a = {}
    a["patient_scale"] = float(rng.uniform(0.85, 1.15))
    cx, cy = _REF_CX * rng.uniform(0.92, 1.08), _REF_CY * rng.uniform(0.9, 1.1)
    muscle, fat = rng.uniform(8, 14), rng.uniform(10, 35)
    a.update(cavity=(cx, cy), body=(cx + muscle + fat, cy + muscle + fat), wall=(cx + muscle, cy + muscle))
    frame = _Frame(rng, cx, cy, muscle)
    g = frame.g
    a["organ_scale"] = _organ_scales(rng, organ_scale)

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
    return a, frame


def _background(f: _Frame) -> list:
    """Background (label 0) structures: (primitive, hu spec, cavity_only)."""
    rng, fx, fy, g, p, tube, ellipsoid = f.rng, f.fx, f.fy, f.g, f.p, f.tube, f.ellipsoid
    cx, cy, muscle = f.cx, f.cy, f.muscle
    bg = []
    muscle_hu, lung_hu = ("solid", "muscle"), ("solid", "lung")
    vein_hu, artery_hu = ("solid", "portal"), ("solid", "artery")
    bone_hu = ("shell", "cortical", "cancellous", 0.25)

    def add(prim, spec, cavity_only=True):
        bg.append((prim, spec, cavity_only))

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

    return bg


def _organs(f: _Frame, s: dict) -> tuple[dict, list]:
    """The 13 organs (label -> list of (primitive, hu spec)) and the intrahepatic vessels."""
    rng, fx, fy, g, p, tube, ellipsoid = f.rng, f.fx, f.fy, f.g, f.p, f.tube, f.ellipsoid
    o = {}
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
    return o, liver_vessels


def _anatomy(rng: np.random.Generator, organ_scale=None) -> dict:
    """Draw one patient: body habitus, intensities and every structure, in reference patient mm."""
    a, frame = _habitus(rng, organ_scale)
    bg = _background(frame)
    o, liver_vessels = _organs(frame, a["organ_scale"])
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
