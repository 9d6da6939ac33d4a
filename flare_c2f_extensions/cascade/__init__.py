"""The cascade: the ResUNet-ASPP network and the one module holding every stage's network, the stages built from
their bundles' configs, the engines that run them (torch, OpenVINO), the whole coarse-to-fine cascade and its MONAI
inferer, and assembling / exporting the cascade bundle's ``models/model.pt``.
"""
