"""Training the stages through their bundles' ``train.json``: the decoded-once cache, progress and logs, resumable
state, assembling the trained cascade, and self-training on pseudo-labels.
"""
