"""Releases: packaging, downloading and verifying published bundles, and the public sample CT.
"""
