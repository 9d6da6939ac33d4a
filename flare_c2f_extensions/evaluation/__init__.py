"""Evaluation: FLARE22 DSC and NSD per organ and case, and the quality signals of a label map without a reference
(confidence, dropped components, organ volumes against a reference cohort).
"""
