"""The 3D ResUNet with an ASPP bottleneck used by every stage of the cascade (Chen, Xu, Zhang, FLARE 2022)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.blocks import SimpleASPP, UnetOutBlock, UnetResBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

__all__ = [
    "CASCADE_STAGES", "PAPER_CHANNELS", "CascadeNetwork", "ResUNetASPP", "count_flops", "count_parameters", "describe",
]

# Default widths, chosen to match the paper's size (15.17 M parameters, 93.43 G at 128^3): they give
# 15.19 M parameters and 93.77 G multiply-adds at 128^3 (`python -m flare_c2f_extensions network_info`).
PAPER_CHANNELS = (12, 24, 64, 192, 384)


class ResUNetASPP(nn.Module):
    """U-Net of residual blocks with ``len(channels) - 1`` down- and up-sampling levels and an ASPP bottleneck.

    Encoder level ``i`` is ``blocks_per_level`` residual blocks at width ``channels[i]`` (the first of them
    strided by 2 for ``i > 0``); the bottleneck runs an atrous spatial pyramid (parallel convolutions with
    ``aspp_dilations``) and fuses it back to ``channels[-1]``; each decoder level upsamples with a transposed
    convolution, concatenates the skip connection and runs residual blocks. Weights are He (kaiming) normal.

    Args:
        spatial_dims: 3 for volumes (2 works for quick experiments).
        in_channels: image channels (1 for CT).
        out_channels: classes including background.
        channels: widths from the full-resolution level down to the bottleneck; the default gives the
            paper's four down-sampling levels.
        blocks_per_level: residual blocks per encoder/decoder level.
        aspp_dilations: dilation of each ASPP branch (a 1x1 branch for dilation 1, 3x3x3 otherwise).
        norm: MONAI norm name, e.g. ``"instance"`` or ``"batch"``.
        act: MONAI activation name.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 14,
        channels: Sequence[int] = PAPER_CHANNELS,
        blocks_per_level: int = 1,
        aspp_dilations: Sequence[int] = (1, 2, 4, 6),
        norm: str | tuple = "instance",
        act: str | tuple = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two widths (one down-sampling level), got {channels}")
        if blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be >= 1, got {blocks_per_level}")
        self.num_levels = len(channels) - 1
        self.size_multiple = 2**self.num_levels  # an int attribute: TorchScript computes int ** int as a float
        self.spatial_dims = spatial_dims

        def res_blocks(cin: int, cout: int, stride: int) -> nn.Sequential:
            blocks = [UnetResBlock(spatial_dims, cin, cout, 3, stride, norm, act)]
            blocks += [UnetResBlock(spatial_dims, cout, cout, 3, 1, norm, act) for _ in range(blocks_per_level - 1)]
            return nn.Sequential(*blocks)

        self.encoder = nn.ModuleList(
            [res_blocks(in_channels, channels[0], 1)]
            + [res_blocks(channels[i - 1], channels[i], 2) for i in range(1, len(channels))]
        )
        branch = max(1, channels[-1] // len(aspp_dilations))
        self.aspp = nn.Sequential(
            SimpleASPP(
                spatial_dims,
                channels[-1],
                branch,
                kernel_sizes=[1 if d == 1 else 3 for d in aspp_dilations],
                dilations=list(aspp_dilations),
                norm_type=norm,
                acti_type=act,
            ),
            UnetResBlock(spatial_dims, branch * len(aspp_dilations), channels[-1], 1, 1, norm, act),
        )
        self.upsample = nn.ModuleList(
            [
                get_conv_layer(
                    spatial_dims, channels[i + 1], channels[i], 2, 2, act=None, norm=None, conv_only=True,
                    is_transposed=True,
                )
                for i in reversed(range(self.num_levels))
            ]
        )
        self.decoder = nn.ModuleList(
            [res_blocks(2 * channels[i], channels[i], 1) for i in reversed(range(self.num_levels))]
        )
        self.head = UnetOutBlock(spatial_dims, channels[0], out_channels)
        self.apply(_he_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.size_multiple
        for size in x.shape[2:]:
            if size % factor != 0:  # written without f-strings or generators so that torch.jit.script compiles it
                raise ValueError(
                    "spatial size " + str(list(x.shape[2:])) + " must be divisible by " + str(factor)
                    + " (" + str(self.num_levels) + " down-sampling levels)"
                )
        skips: list[torch.Tensor] = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = self.aspp(skips.pop())
        for up, dec in zip(self.upsample, self.decoder):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def _cascade_stages() -> dict[str, tuple[int, ...]]:
    from flare_c2f_extensions.labels import GROUPS, ORGANS

    stages = {"coarse": tuple(ORGANS), **{group: GROUPS[group] for group in ("solid", "digestive", "vessels")}}
    stages["locator"] = GROUPS["small"]
    stages.update({f"refiner_{ORGANS[organ]}": (organ,) for organ in GROUPS["small"]})
    return stages


# every network of the cascade by its submodule name in CascadeNetwork, with the FLARE ids of its channels 1..k
CASCADE_STAGES = _cascade_stages()


class CascadeNetwork(nn.Module):
    """Every network of the cascade in one module, a named submodule each (:data:`CASCADE_STAGES`): ``coarse``,
    ``solid``, ``digestive``, ``vessels``, ``locator`` and ``refiner_<organ>`` for the four small organs.

    It is the cascade bundle's ``network_def``: one state dict holds the whole cascade (``models/model.pt``) and one
    TorchScript export (``ckpt_export``) carries it. :class:`~.pipeline.CascadeInferer` runs the
    cascade by calling the submodules; ``forward`` is the coarse stage alone (what ``verify_net_in_out`` checks).

    Args:
        stages: ResUNetASPP arguments per submodule name, over ``common`` (e.g. narrower trained stages).
        common: ResUNetASPP arguments for every stage (``out_channels`` follows from the stage's organs).
    """

    def __init__(self, stages: Mapping[str, Mapping] | None = None, **common):
        super().__init__()
        unknown = sorted(set(stages or {}) - set(CASCADE_STAGES))
        if unknown:
            raise ValueError(f"unknown cascade stage(s) {unknown}; stages: {list(CASCADE_STAGES)}")
        for name, labels in CASCADE_STAGES.items():
            arguments = {**common, **dict((stages or {}).get(name, {})), "out_channels": len(labels) + 1}
            setattr(self, name, ResUNetASPP(**arguments))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coarse(x)


def _he_normal(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=0.01, nonlinearity="leaky_relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def count_flops(network: nn.Module, spatial_size: int | Sequence[int] = 128, in_channels: int = 1) -> int:
    """FLOPs of one forward pass on a single-image batch, counted by ``torch.utils.flop_counter``.

    torch counts 2 FLOPs per multiply-add of convolutions and matrix products (norms and activations are
    not counted); halve it for multiply-adds (the figure tools such as thop print as "FLOPs").
    """
    from torch.utils.flop_counter import FlopCounterMode

    size = (spatial_size,) * 3 if isinstance(spatial_size, int) else tuple(spatial_size)
    x = torch.zeros(1, in_channels, *size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network.to("meta")(x)
    return counter.get_total_flops()


def describe(spatial_size: int = 128, **network_args) -> dict:
    """Parameters and compute of a ResUNetASPP, e.g. ``describe(160)`` for the paper-size fine stage."""
    network = ResUNetASPP(**network_args)
    flops = count_flops(network, spatial_size)
    return {
        "parameters": count_parameters(network),
        "spatial_size": spatial_size,
        "gflops": round(flops / 1e9, 2),
        "gmacs": round(flops / 2e9, 2),
    }
