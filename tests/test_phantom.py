"""The synthetic cohort generator: determinism, anatomy in world coordinates, orientation, files, CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import aff2axcodes
from scipy import ndimage

from flare_c2f_extensions.labels import NUM_ORGANS, ORGAN_IDS, ORGANS
from flare_c2f_extensions.synthetic.phantom import Case, make_case, organ_centroids, write_cohort

DEFAULT = (96, 96, 64)
TINY = (48, 48, 32)


def _world(case: Case, mask: np.ndarray) -> np.ndarray:
    """RAS+ world coordinates (mm) of the voxels in ``mask``."""
    return np.argwhere(mask) @ case.affine[:3, :3].T + case.affine[:3, 3]


@pytest.fixture(scope="module")
def cases():
    """Default-shape cases, alternating RAS / LPS storage."""
    return [make_case(seed, shape=DEFAULT, orientation=("RAS", "LPS")[seed % 2]) for seed in range(6)]


def test_world_convention_is_ras():
    # +x of the NIfTI/nibabel world points to the patient's Right, +y Anterior, +z Superior.
    assert aff2axcodes(np.eye(4)) == ("R", "A", "S")
    assert aff2axcodes(make_case(0, shape=(16, 16, 8), orientation="LPS").affine) == ("L", "P", "S")


def test_deterministic_by_seed():
    a, b = make_case(11, shape=TINY), make_case(11, shape=TINY)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    c = make_case(12, shape=TINY)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.label, c.label)
    assert not np.array_equal(a.affine, c.affine)


def test_types_shapes_and_all_organs(cases):
    for case in cases:
        assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
        assert case.image.shape == case.label.shape == DEFAULT
        assert case.affine.shape == (4, 4) and case.affine.dtype == np.float64
        counts = np.bincount(case.label.ravel(), minlength=NUM_ORGANS + 1)
        assert len(counts) == NUM_ORGANS + 1  # ids 0..13 only
        assert all(counts[label] > 0 for label in ORGANS), case.info["voxels"]
        for label in (ORGAN_IDS["right_adrenal_gland"], ORGAN_IDS["left_adrenal_gland"], ORGAN_IDS["gallbladder"]):
            assert counts[label] >= 50, (ORGANS[label], counts[label])  # small organs stay visible
        assert counts[0] > 0.3 * case.label.size  # body wall, fat, air, spine... are background


@pytest.mark.parametrize("shape", [(48, 48, 32), (32, 32, 16), (20, 20, 10)])
def test_tiny_shapes_keep_every_organ(shape):
    for seed in range(3):
        case = make_case(seed, shape=shape, spacing=(0.8, 0.8, 5.0 if seed == 2 else 1.0))
        present = set(np.unique(case.label)) - {0}
        assert present == set(ORGANS), sorted(set(ORGANS) - present)


def test_anatomical_arrangement_in_world_coordinates(cases):
    ids = ORGAN_IDS
    for case in cases:
        c = organ_centroids(case)
        x = {k: c[v][0] for k, v in ids.items()}  # +x = patient right
        y = {k: c[v][1] for k, v in ids.items()}  # +y = anterior
        z = {k: c[v][2] for k, v in ids.items()}  # +z = superior
        # spine: bone-HU background voxels between the kidneys
        mid = 0.5 * (x["right_kidney"] + x["left_kidney"])
        half = 0.25 * abs(x["right_kidney"] - x["left_kidney"])
        bone = _world(case, (case.image > 300) & (case.label == 0))
        spine = bone[np.abs(bone[:, 0] - mid) < half]
        assert len(spine) > 50
        spine_x, spine_y = spine[:, 0].mean(), spine[:, 1].mean()
        info = case.info["orientation"]

        assert x["liver"] > mid > x["spleen"], info  # liver on the right, spleen on the left
        assert x["right_kidney"] > spine_x > x["left_kidney"]
        assert x["inferior_vena_cava"] > spine_x > x["aorta"]  # aorta left of the spine, IVC to its right
        assert y["aorta"] > spine_y and y["inferior_vena_cava"] > spine_y  # both anterior of the spine
        assert max(y["right_kidney"], y["left_kidney"]) < y["aorta"]  # kidneys posterior
        assert x["right_adrenal_gland"] > x["left_adrenal_gland"]
        assert z["right_adrenal_gland"] > z["right_kidney"] and z["left_adrenal_gland"] > z["left_kidney"]
        assert x["right_adrenal_gland"] < x["right_kidney"] and x["left_adrenal_gland"] > x["left_kidney"]  # medial
        assert z["gallbladder"] < z["liver"] and x["gallbladder"] > spine_x
        assert z["esophagus"] > z["stomach"]
        assert x["stomach"] < spine_x < x["liver"]  # stomach left-upper
        assert z["stomach"] > z["pancreas"]
        pancreas = _world(case, case.label == ids["pancreas"])
        assert pancreas[:, 0].min() < spine_x < pancreas[:, 0].max()  # across the midline
        assert x["duodenum"] > x["pancreas"]
        assert spine_y < min(y[k] for k in ("liver", "stomach", "pancreas"))  # spine posterior


def test_esophagus_enters_stomach_and_duodenum_wraps_pancreas_head(cases):
    ids = ORGAN_IDS
    for case in cases:
        esophagus = case.label == ids["esophagus"]
        assert (ndimage.binary_dilation(esophagus) & (case.label == ids["stomach"])).any()
        c = organ_centroids(case)
        pancreas = _world(case, case.label == ids["pancreas"])
        head = pancreas[pancreas[:, 0] > c[ids["inferior_vena_cava"]][0]]  # right of the IVC
        duodenum = _world(case, case.label == ids["duodenum"])
        assert len(head)
        assert duodenum[:, 0].max() > head[:, 0].max()  # descending part lateral to the head
        assert duodenum[:, 2].min() < head[:, 2].min()  # horizontal part below it
        assert duodenum[:, 2].max() > head[:, 2].mean()  # bulb above it


def test_ct_like_intensities(cases):
    ids = ORGAN_IDS
    for case in cases:
        med = {name: np.median(case.image[case.label == label]) for name, label in ids.items()}
        assert 30 < med["liver"] < 95 and 20 < med["spleen"] < 85
        assert med["aorta"] > 120 and med["inferior_vena_cava"] > 100
        assert med["left_kidney"] > 80 and med["right_kidney"] > 80
        assert -20 < med["pancreas"] < 80 and -20 < med["gallbladder"] < 50
        corners = case.image[[0, 0, -1, -1], [0, -1, 0, -1], :]
        assert np.median(corners) < -900  # air outside the body
        background = case.image[case.label == 0]
        assert ((background > -150) & (background < -50)).mean() > 0.05  # fat
        assert np.percentile(background, 99.9) > 400  # bone
        assert case.image.std() > 100


def test_ras_and_lps_describe_the_same_anatomy():
    ras = make_case(5, shape=(40, 36, 24))
    lps = make_case(5, shape=(40, 36, 24), orientation="LPS")
    assert aff2axcodes(ras.affine) == ("R", "A", "S") and aff2axcodes(lps.affine) == ("L", "P", "S")
    np.testing.assert_array_equal(lps.image, ras.image[::-1, ::-1, :])
    np.testing.assert_array_equal(lps.label, ras.label[::-1, ::-1, :])
    canonical = nib.as_closest_canonical(nib.Nifti1Image(lps.label, lps.affine))
    np.testing.assert_allclose(canonical.affine, ras.affine, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(canonical.dataobj), ras.label)
    c_ras, c_lps = organ_centroids(ras), organ_centroids(lps)
    for label in ORGANS:
        np.testing.assert_allclose(c_ras[label], c_lps[label], atol=1e-6)
    # other flip-only codes work too; axis permutations are refused
    assert aff2axcodes(make_case(5, shape=(40, 36, 24), orientation="LAI").affine) == ("L", "A", "I")
    with pytest.raises(ValueError):
        make_case(5, shape=(40, 36, 24), orientation="SRA")


def test_varied_spacing_fov_and_size():
    cases = [make_case(seed, shape=(24, 24, 16)) for seed in range(24)]
    spacings = np.array([c.spacing for c in cases])
    assert np.all((spacings[:, :2] >= 0.6) & (spacings[:, :2] <= 1.0))
    assert np.all((spacings[:, 2] >= 1.0) & (spacings[:, 2] <= 5.0))
    assert len(np.unique(spacings[:, 0])) > 10 and len(np.unique(spacings[:, 2])) > 3
    # cranio-caudal position of the organs within the field of view varies
    liver_slice = [np.argwhere(c.label == ORGAN_IDS["liver"])[:, 2].mean() / c.label.shape[2] for c in cases]
    assert np.ptp(liver_slice) > 0.15
    scales = np.array([list(c.info["organ_scale"].values()) for c in cases])
    assert np.all((scales >= 0.85) & (scales <= 1.15)) and scales.std() > 0.05
    assert len({c.info["patient_scale"][0] for c in cases}) == len(cases)
    # explicit options
    fixed = make_case(3, shape=(24, 24, 16), spacing=(0.7, 0.7, 2.0), organ_scale={"liver": 1.1}, fov=(0.5, 0.9))
    np.testing.assert_allclose(fixed.spacing, (0.7, 0.7, 2.0))
    assert fixed.info["organ_scale"]["liver"] == 1.1
    assert make_case(3, shape="24,24,16", spacing=0.8, organ_scale=1.0).info["organ_scale"]["spleen"] == 1.0


def test_clinical_in_plane_size():
    case = make_case(1, shape=(512, 512, 40), spacing=(0.8, 0.8, 5.0))
    assert case.image.shape == (512, 512, 40)
    assert set(np.unique(case.label)) - {0} == set(ORGANS)
    assert case.info["patient_scale"][0] > 0.8  # physical size at a clinical field of view
    assert min(case.info["voxels"][ORGANS[label]] for label in (7, 8, 9)) > 300


def test_write_cohort_layout_and_files(tmp_path):
    out = tmp_path / "cohort"
    paths = write_cohort(out, n=2, n_test=1, seed=3, shape=(32, 32, 20))
    assert [os.path.basename(p) for p in paths["imagesTr"]] == [
        "FLARE22_Tr_0001_0000.nii.gz",
        "FLARE22_Tr_0002_0000.nii.gz",
    ]
    assert [os.path.basename(p) for p in paths["labelsTr"]] == ["FLARE22_Tr_0001.nii.gz", "FLARE22_Tr_0002.nii.gz"]
    assert [os.path.basename(p) for p in paths["imagesTs"]] == ["FLARE22_Ts_0001_0000.nii.gz"]
    assert [os.path.basename(p) for p in paths["labelsTs"]] == ["FLARE22_Ts_0001.nii.gz"]
    assert not [f for d in out.iterdir() for f in d.iterdir() if f.name.startswith(".tmp")]
    codes = []
    for image_path, label_path in zip(paths["imagesTr"] + paths["imagesTs"], paths["labelsTr"] + paths["labelsTs"]):
        image, label = nib.load(image_path), nib.load(label_path)
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert image.shape == label.shape == (32, 32, 20)
        np.testing.assert_allclose(image.affine, label.affine)
        for img in (image, label):
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
            np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)
        data = np.asarray(label.dataobj)
        assert set(np.unique(data)) - {0} == set(ORGANS)
        codes.append(aff2axcodes(image.affine))
    assert codes[:2] == [("R", "A", "S"), ("L", "P", "S")]  # orientations cycle by case number

    # case i depends on (seed, split, i) only, not on n; held-out cases differ from training ones
    again = write_cohort(tmp_path / "one", n=1, seed=3, shape=(32, 32, 20))
    first = nib.load(paths["imagesTr"][0])
    np.testing.assert_array_equal(np.asarray(nib.load(again["imagesTr"][0]).dataobj), np.asarray(first.dataobj))
    np.testing.assert_allclose(nib.load(again["imagesTr"][0]).affine, first.affine)
    assert not np.array_equal(np.asarray(nib.load(paths["imagesTs"][0]).dataobj), np.asarray(first.dataobj))
    other = write_cohort(tmp_path / "seed4", n=1, seed=4, shape=(32, 32, 20))
    assert not np.array_equal(np.asarray(nib.load(other["imagesTr"][0]).dataobj), np.asarray(first.dataobj))


def test_written_file_matches_make_case(tmp_path):
    paths = write_cohort(tmp_path, n=2, seed=0, shape=(24, 24, 12), orientations="LPS")
    image = nib.load(paths["imagesTr"][1])
    assert aff2axcodes(image.affine) == ("L", "P", "S")
    centroids = {}
    for label in ORGANS:
        idx = np.argwhere(np.asarray(nib.load(paths["labelsTr"][1]).dataobj) == label)
        centroids[label] = image.affine[:3, :3] @ idx.mean(axis=0) + image.affine[:3, 3]
    assert centroids[ORGAN_IDS["liver"]][0] > centroids[ORGAN_IDS["spleen"]][0]


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "flare_c2f_extensions",
        "phantom",
        "--out",
        str(out),
        "--n",
        "2",
        "--seed",
        "0",
        "--shape",
        "32,32,16",
        "--n_test",
        "1",
        "--n_unlabelled",
        "1",
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "FLARE22_Tr_0001_0000.nii.gz",
        "FLARE22_Tr_0002_0000.nii.gz",
    ]
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == ["FLARE22_Ts_0001.nii.gz"]
    assert sorted(p.name for p in (out / "imagesUnlabelled").iterdir()) == ["FLARE22_Unlabelled_0001_0000.nii.gz"]
    assert sorted(p.name for p in (out / "truthUnlabelled").iterdir()) == ["FLARE22_Unlabelled_0001.nii.gz"]
    assert nib.load(out / "imagesTr" / "FLARE22_Tr_0001_0000.nii.gz").shape == (32, 32, 16)


def test_unlabelled_part_keeps_its_truth_aside(tmp_path):
    from flare_c2f_extensions.io.discovery import find_images, labelled_cases

    out = tmp_path / "cohort"
    paths = write_cohort(out, n=1, n_unlabelled=2, seed=3, shape=(32, 32, 20))
    names = [os.path.basename(p) for p in paths["imagesUnlabelled"]]
    assert names == ["FLARE22_Unlabelled_0001_0000.nii.gz", "FLARE22_Unlabelled_0002_0000.nii.gz"]
    assert [os.path.basename(p) for p in paths["truthUnlabelled"]] == [
        "FLARE22_Unlabelled_0001.nii.gz",
        "FLARE22_Unlabelled_0002.nii.gz",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["imagesTr", "imagesUnlabelled", "labelsTr", "truthUnlabelled"]
    # the labelled cases and the images to segment are found as before; the truth is in no folder they read
    assert [c["label"] for c in labelled_cases(out)] == paths["labelsTr"]
    assert [c["image"] for c in find_images(out, "imagesUnlabelled")] == paths["imagesUnlabelled"]
    for image_path, truth_path in zip(paths["imagesUnlabelled"], paths["truthUnlabelled"]):
        image, truth = nib.load(image_path), nib.load(truth_path)
        assert image.shape == truth.shape == (32, 32, 20)
        np.testing.assert_allclose(image.affine, truth.affine)
        assert set(np.unique(np.asarray(truth.dataobj))) - {0} == set(ORGANS)
    # unlabelled cases are drawn from their own seeds: none repeats a training case
    unlabelled = np.asarray(nib.load(paths["imagesUnlabelled"][0]).dataobj)
    assert not np.array_equal(unlabelled, np.asarray(nib.load(paths["imagesTr"][0]).dataobj))
    # adding an unlabelled part changes nothing in the labelled one
    plain = write_cohort(tmp_path / "plain", n=1, seed=3, shape=(32, 32, 20))
    assert not plain["imagesUnlabelled"]
    np.testing.assert_array_equal(
        np.asarray(nib.load(plain["imagesTr"][0]).dataobj), np.asarray(nib.load(paths["imagesTr"][0]).dataobj)
    )
