"""``python -m flare_c2f_extensions <command>``: the ``flare-c2f`` program (:mod:`.cli.commands`)."""

from flare_c2f_extensions.cli.commands import console, main

__all__ = ["console", "main"]

if __name__ == "__main__":
    console()
