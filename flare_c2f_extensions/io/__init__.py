"""Reading and writing images: CT headers and voxels (NIfTI, DICOM series), finding the cases of a folder, label
maps and the other outputs of a case (per-organ masks, DICOM SEG, statistics, preview), and writing files safely
(atomic writes, provenance records, refusing to overwrite what this tool did not write).
"""
