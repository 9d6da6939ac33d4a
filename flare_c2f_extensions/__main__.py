"""Command line: ``python -m flare_c2f_extensions <command> --help``."""

from __future__ import annotations


def phantom(out: str, n: int = 4, seed: int = 0, **options):
    """Write a synthetic FLARE22-layout cohort (see ``flare_c2f_extensions.phantom.write_cohort``)."""
    from .phantom import write_cohort

    return write_cohort(out, n=n, seed=seed, **options)


def network_info(spatial_size: int = 128, channels=None, blocks_per_level: int = 1, out_channels: int = 14):
    """Parameter count and FLOPs of the ResUNet-ASPP (defaults: the paper-size network)."""
    from .networks import PAPER_CHANNELS, describe

    return describe(spatial_size, channels=channels or PAPER_CHANNELS, blocks_per_level=blocks_per_level, out_channels=out_channels)


def evaluate(pred: str, gt: str, out: str):
    """FLARE22 DSC and NSD of the label maps in ``pred`` against ``gt``; writes metrics.csv and summary.json."""
    from .metrics import evaluate_folder, format_summary

    print(format_summary(evaluate_folder(pred, gt, out)))


def quickstart(out: str = "./quickstart", **options):
    """Generate a cohort, train briefly, segment held-out cases and evaluate them, on the CPU."""
    from .quickstart import quickstart as run

    run(out, **options)


COMMANDS = {"quickstart": quickstart, "phantom": phantom, "evaluate": evaluate, "network_info": network_info}


def main():
    import fire

    fire.Fire(COMMANDS)


if __name__ == "__main__":
    main()
