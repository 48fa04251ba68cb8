"""Co-grounding (Song et al., CVPR 2021): SL-Att on images, CG-SL-Att with post-processing on video."""

from .method import METHOD, CoGroundingMethod

__all__ = ["METHOD", "CoGroundingMethod"]
