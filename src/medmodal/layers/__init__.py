"""Component layers: pure ``nn.Module``s and functions shared by networks (layer 2 "components"; imports torch,
monai, :mod:`medmodal.layers` and the data layer below it).

* :mod:`medmodal.layers.sac`: PUMIT's spatially adaptive convolutions and their explicit anisotropy state.
"""

from medmodal.layers.sac import (
    SACConv,
    SACConvTranspose,
    SACState,
    degree_of_anisotropy,
    inflate_2d_weight,
    sac_interpolate,
)

__all__ = [
    "SACConv",
    "SACConvTranspose",
    "SACState",
    "degree_of_anisotropy",
    "inflate_2d_weight",
    "sac_interpolate",
]
