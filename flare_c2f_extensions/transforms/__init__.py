"""MONAI transforms of the stages, dictionary and array versions: the crop of a stage's box from a guide mask, the
resize to its grid and back, the largest connected component; and the box arithmetic beneath them.
"""
