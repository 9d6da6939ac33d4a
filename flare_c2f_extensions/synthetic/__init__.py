"""Synthetic data: generated abdominal CTs with known organs (anatomy, painting, a FLARE22-layout cohort), for the
quickstart, the benchmarks and the tests.
"""
