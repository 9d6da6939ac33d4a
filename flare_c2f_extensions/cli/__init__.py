"""The command line (``flare-c2f <command>``): commands, option checking, and the quickstart.
"""
