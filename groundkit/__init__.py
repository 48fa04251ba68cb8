"""groundkit: grounding language in images and video from weak, pseudo or distilled supervision."""

__version__ = "0.1.0"
