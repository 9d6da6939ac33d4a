"""Reading a CT: headers and their checks (:func:`image_geometry`), voxels in Hounsfield units from NIfTI (scaling
applied, ISA-L inflation) or DICOM, NaN and infinities sanitised, and :func:`read_ct` for the networks.

How unusual inputs are handled (:func:`read_ct`):

- any orientation, oblique affines and permuted axes: the CT is reoriented to the closest RAS array layout
  (flips and axis permutations only, no resampling) and the label map is put back into the file's own layout,
  so the output has exactly the input's shape and affine;
- integer and float voxel types, NIfTI ``scl_slope``/``scl_inter`` and DICOM RescaleSlope/RescaleIntercept
  (per slice) are applied: the networks see Hounsfield units;
- NaN voxels become air (-1000 HU) and infinite voxels the window's ends, with a warning that names the file and
  counts them; an image with no finite voxel is an error;
- 8-bit integer images (label maps, windowed screenshots) are an error: a CT in HU needs more than 8 bits;
  an image with no voxel below -500 HU (no air: a label map in 16 bits, an MR, a normalised image) gets a
  warning and is segmented anyway;
- a volume that is not 3D (2D, or 4D with more than one frame), empty, with a non-invertible affine, truncated
  or unreadable is an error naming the file.
"""


from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from flare_c2f_extensions.errors import INPUT_LOGGER, InputError
from flare_c2f_extensions.io.dicom import DicomSeries, is_dicom_series
from flare_c2f_extensions.io.geometry import Geometry, check_affine, check_shape

__all__ = [
    "AIR_HU", "CT", "HU_RANGE", "NO_AIR_HU", "TILE", "c_order_copy", "check_volume", "image_geometry", "read_ct",
    "read_voxels",
]

logger = logging.getLogger(INPUT_LOGGER)

HU_RANGE = (-100.0, 300.0)  # the intensity window of every stage (ScaleIntensityRanged in the bundles)
AIR_HU = -1000.0  # what NaN voxels become
NO_AIR_HU = -500.0  # an abdominal CT in HU always holds voxels below this (air around the body, gas, lung)
MAX_GZIP_RATIO = 1100  # deflate's best is about 1032:1 (all zeros)


def _check_size(path: Path, nifti, shape, what: str) -> None:
    """Refuse a file too small for the voxels its header claims, before anything is allocated or decompressed.

    ``.nii``: header offset + voxel bytes must fit in the file. ``.nii.gz``: deflate cannot compress more than about
    1032:1, so a claim over :data:`MAX_GZIP_RATIO` times the file size is a truncated or corrupt file.
    """
    try:
        needed = int(np.prod(shape, dtype=np.int64)) * nifti.get_data_dtype().itemsize
        size = path.stat().st_size
        offset = int(nifti.dataobj.offset)
    except Exception:  # unusual image types: leave it to the reader
        return
    if str(path).lower().endswith(".gz"):
        if needed > MAX_GZIP_RATIO * size:
            raise InputError(
                f"{path}: truncated or corrupt {what}: its header claims {needed} bytes of voxels, more than a "
                f"{size}-byte gzip file can hold"
            )
    elif size < offset + needed:
        raise InputError(
            f"{path}: truncated {what}: its header claims {offset + needed} bytes, the file has {size}"
        )


def _check_path(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path}: {what} file does not exist")
    if not (path.is_file() or is_dicom_series(path)):
        kind = "a folder with no DICOM files" if path.is_dir() else "not a regular file"
        raise InputError(f"{path}: {what} is {kind} (expected a NIfTI file or a DICOM series folder)")


def check_volume(path: str | os.PathLike, what: str = "image") -> tuple[int, int, int]:
    """Read the header of ``path`` and return its 3D shape; raise :class:`InputError` if it is not a 3D image.

    ``path`` is a NIfTI file or a DICOM series folder. A 4D NIfTI whose fourth axis has length 1 counts as 3D.
    Only headers are read, so this is cheap.
    """
    return image_geometry(path, what).shape



def image_geometry(path: str | os.PathLike, what: str = "image") -> Geometry:
    """Shape and affine of a NIfTI file or a DICOM series folder, from headers only; :class:`InputError` if the
    image cannot be used (not 3D, unreadable header, singular affine, ...)."""
    path = Path(path)
    _check_path(path, what)
    if path.is_dir():
        series = DicomSeries.read(path, pixels=False)
        return Geometry(str(path), series.shape, series.affine)
    try:
        nifti = nib.load(str(path))
        shape = tuple(int(s) for s in nifti.shape)
    except Exception as error:  # nibabel raises several types for files it cannot parse
        raise InputError(f"{path}: not a readable NIfTI {what} ({error})") from None
    shape = check_shape(path, shape, what)
    if nifti.get_data_dtype().fields is not None:  # RGB24 / RGBA32: one record of channels per voxel
        raise InputError(f"{path}: a colour (RGB) {what}, not a CT: a CT holds one intensity per voxel")
    if nifti.get_data_dtype().kind == "c":
        raise InputError(f"{path}: a complex-valued {what} ({nifti.get_data_dtype()}), not a CT: a CT holds real HU")
    _check_size(path, nifti, shape, what)
    # NIfTI-2 and friends: keep the geometry, write a fresh NIfTI-1 header
    header = nifti.header if type(nifti.header) is nib.Nifti1Header else nib.Nifti1Header()
    return Geometry(str(path), shape, check_affine(path, nifti.affine), header)



def _load_nifti(path: Path):
    """``(image, raw)``: ``nib.load``, but a gzipped NIfTI-1 is inflated with ISA-L (``isal``), about twice as fast as
    zlib (on a 512x512x300 CT the read is a visible part of the cascade's time); ``raw`` is then the inflated file,
    else ``None``."""
    if path.name.lower().endswith(".gz"):
        try:
            from isal import igzip
        except ImportError:  # pragma: no cover - isal is a dependency; zlib still works
            return nib.load(str(path)), None
        with igzip.open(path, "rb") as handle:
            raw = handle.read()
        if len(raw) >= 4 and int.from_bytes(raw[:4], "little") == 348:  # NIfTI-1 header size
            return nib.Nifti1Image.from_bytes(raw), raw
    return nib.load(str(path)), None


def _stored_voxels(nifti, raw: bytes | None) -> np.ndarray:
    """The unscaled voxels as stored: a read-only view of the inflated bytes where there are any (no copy of the
    volume), else read through nibabel."""
    proxy = nifti.dataobj
    offset, shape = getattr(proxy, "offset", None), tuple(nifti.shape)
    dtype = nifti.get_data_dtype()
    if raw is not None and offset is not None and getattr(proxy, "order", "F") == "F":
        if offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize <= len(raw):
            return np.ndarray(shape, dtype=dtype, buffer=raw, offset=int(offset), order="F")
    return np.asarray(proxy)


def read_voxels(path: Path, geometry: Geometry | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The image's voxels in HU (float32, or int16 when stored so unscaled; 3D, the file's own layout) and its
    affine. An unscaled int16 volume from a gzipped file is a read-only view of the inflated bytes. ``geometry``:
    the headers already read (:func:`image_geometry`), else they are read here."""
    path = Path(path)
    if path.is_dir():
        series = DicomSeries.read(path, pixels=True)
        return series.data, series.affine
    geometry = geometry or image_geometry(path)
    try:
        nifti, raw = _load_nifti(path)
        stored = nifti.get_data_dtype()
        # nibabel moves scl_slope/scl_inter from the header into the data proxy when it loads the file
        slope, inter = getattr(nifti.dataobj, "slope", 1.0), getattr(nifti.dataobj, "inter", 0.0)
        unscaled = slope in (None, 1.0) and inter in (None, 0.0)
        if stored.kind in "ui" and stored.itemsize == 1 and unscaled:
            raise InputError(
                f"{path}: an 8-bit integer image ({stored}) cannot hold Hounsfield units: a label map, not a CT"
            )
        if stored == np.int16 and unscaled:  # the usual CT: kept in int16 (2 bytes a voxel) until read_ct scales it
            data = _stored_voxels(nifti, raw)
        else:
            data = np.asarray(nifti.dataobj, dtype=np.float32)
        del nifti, raw
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"{path}: cannot read the image data ({error})") from None
    return data.reshape(geometry.shape), geometry.affine


TILE = (64, 64, 16)  # elements of a tile along the source's fastest, middle and slowest axes: ~128 KB of int16


def c_order_copy(array: np.ndarray) -> np.ndarray:
    """A C-ordered copy of a 3D array view (e.g. a Fortran-ordered volume reoriented by flips and transposes).

    Where the view's memory order differs from C order, the copy goes tile by tile (:data:`TILE`), so that both
    the reads and the writes of a tile stay in the cache: a plain ``np.ascontiguousarray`` of a Fortran-ordered
    512x512x300 volume strides through memory and takes 3 to 5 times longer.
    """
    strides = [abs(s) for s in array.strides]
    if array.ndim != 3 or strides == sorted(strides, reverse=True):
        return np.ascontiguousarray(array)  # already C-like (at most flipped): a streaming copy
    out = np.empty(array.shape, dtype=array.dtype)
    tile = [0, 0, 0]
    for axis, extent in zip(np.argsort(strides), TILE):
        tile[axis] = extent
    nx, ny, nz = array.shape
    for x in range(0, nx, tile[0]):
        for y in range(0, ny, tile[1]):
            for z in range(0, nz, tile[2]):
                part = (slice(x, x + tile[0]), slice(y, y + tile[1]), slice(z, z + tile[2]))
                out[part] = array[part]
    return out


def _sanitise_hu(path, data: np.ndarray) -> np.ndarray:
    """Replace NaN by air and infinities by the window's ends (with a warning); warn when there is no air."""
    low, high = float(np.min(data)), float(np.max(data))
    if not (np.isfinite(low) and np.isfinite(high)):
        finite = np.isfinite(data)
        n_finite = int(np.count_nonzero(finite))
        if n_finite == 0:
            raise InputError(f"{path}: no finite voxel (all NaN or infinite)")
        n_nan = int(np.count_nonzero(np.isnan(data)))
        n_inf = data.size - n_finite - n_nan
        np.nan_to_num(data, copy=False, nan=AIR_HU, posinf=HU_RANGE[1], neginf=HU_RANGE[0])
        logger.warning(
            "%s: %d NaN voxel(s) set to %g HU (air) and %d infinite voxel(s) to the window's ends, of %d voxels",
            path, n_nan, AIR_HU, n_inf, data.size,
        )
        low, high = float(data[finite].min()), float(data[finite].max())
    if low > NO_AIR_HU:
        logger.warning(
            "%s: no voxel below %g HU (values %g to %g): not a CT in Hounsfield units? (a label map, an MR or a "
            "normalised image gives meaningless organs); segmenting it anyway", path, NO_AIR_HU, low, high,
        )
    return data


class CT:
    """A CT opened once, carried from the command line to the written files: ``CT.open(path)`` reads and checks its
    headers (:attr:`geometry`: shape, affine, NIfTI header); :meth:`hu` decodes its voxels in HU (the file's layout,
    NaN and infinities sanitised) and, with ``keep_voxels``, keeps them for what comes after the cascade (statistics,
    preview), so that no step reads the file's headers or decodes its voxels a second time."""

    def __init__(self, path: str | os.PathLike, geometry: Geometry, keep_voxels: bool = False):
        self.path, self.geometry, self.keep_voxels = Path(path), geometry, keep_voxels
        self._voxels: np.ndarray | None = None  # kept HU (keep_voxels)
        self._decoded: np.ndarray | None = None  # decoded ahead (decode), handed to the next hu() call

    @classmethod
    def open(cls, source: str | os.PathLike | CT, keep_voxels: bool = False, what: str = "image") -> CT:
        """``source`` opened (its headers read and checked), or ``source`` itself when it is a :class:`CT`."""
        if isinstance(source, CT):
            source.keep_voxels = source.keep_voxels or keep_voxels
            return source
        return cls(source, image_geometry(source, what), keep_voxels)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine

    def hu(self) -> np.ndarray:
        """The voxels in HU (float32, or int16 as stored; the file's own layout, 3D), decoded on the first call (or
        by :meth:`decode` ahead of it)."""
        if self._voxels is not None:
            return self._voxels
        if self._decoded is not None:
            data, self._decoded = self._decoded, None
        else:
            data = read_voxels(self.path, self.geometry)[0]
        data = _sanitise_hu(self.path, data)  # here, not in decode: its warnings belong to the case being run
        if self.keep_voxels:
            self._voxels = data
        return data

    def decode(self) -> CT:
        """Decode a NIfTI file's voxels now, for :meth:`hu`; logs nothing, so that it can run on another thread
        ahead of the case's turn. A DICOM series is left to :meth:`hu`: its reader warns (a modality other than
        CT), and a warning belongs to its case's turn."""
        if self._voxels is None and self._decoded is None and self.path.is_file():
            self._decoded = read_voxels(self.path, self.geometry)[0]
        return self


def read_ct(image: str | os.PathLike | CT, device: torch.device | str = "cpu") -> tuple[MetaTensor, np.ndarray]:
    """Read a CT once: (1, X, Y, Z) float32 in [0, 1] on ``device``, reoriented to RAS, with its RAS affine.

    ``image``: a NIfTI file or a DICOM series folder, or a :class:`CT` already opened (see the module docstring
    for unusual inputs). Also returns the orientation transform that takes a RAS array back to the file's array
    layout. HU are clipped to [-100, 300] and scaled to [0, 1], as ``ScaleIntensityRanged`` does in the stage
    bundles.
    """
    ct = CT.open(image)
    data, affine = ct.hu(), ct.affine
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(data, ornt)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    copied = c_order_copy(ras)  # a view already in C order is not copied
    if ct.keep_voxels and np.may_share_memory(copied, data):
        copied = copied.copy()  # the scaling below works in place: the kept HU must stay as they are
    tensor = torch.from_numpy(copied).to(device)
    del data, ras, copied
    low, high = HU_RANGE
    if tensor.dtype == torch.int16:  # clamp and shift in int16 (whole HU: exact), then one float copy
        tensor = tensor.clamp_(int(low), int(high)).sub_(int(low)).to(torch.float32)
    else:
        tensor = tensor.clamp_(low, high).sub_(low)
    tensor = tensor.div_(high - low)[None]  # in place: no full-size temporaries
    return MetaTensor(tensor, affine=torch.as_tensor(ras_affine, dtype=torch.float64)), back
