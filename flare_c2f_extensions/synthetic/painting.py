"""Painting a phantom patient onto its voxel grid: the canvas, primitives as voxels, HU values, noise and blur."""

from __future__ import annotations

import numpy as np

from flare_c2f_extensions.labels import GROUPS, NUM_ORGANS
from flare_c2f_extensions.synthetic.anatomy import _densify, _Ellipsoid, _extent, _Tube

__all__ = []

_SMALL = frozenset(GROUPS["small"])
_AIR = -1000.0
_HU_MIN, _HU_MAX = -1024, 3071


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


def _paint_anatomy(canvas, anatomy):
    """Paint the background, then the organs in their order (liver vessels inside the liver)."""
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
