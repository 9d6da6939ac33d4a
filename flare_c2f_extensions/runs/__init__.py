"""Runs over batches of CTs: the one batch runner (claimed outputs, finished cases, failure isolation, report, ranks
under ``torchrun``) and what uses it: ``segment`` (command and Python API), the cascade bundle's run and pseudo-labels.
"""
