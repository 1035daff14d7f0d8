"""The FISH mask object and its builders."""
from .builders import bitfit_mask, from_boolean, from_scores, match_names, random_mask
from .fishmask import BooleanMasks, FishMask, named_shapes
from .heads import DEFAULT_HEADS, head_names

__all__ = [
    "FishMask", "BooleanMasks", "from_scores", "random_mask", "bitfit_mask", "from_boolean", "match_names",
    "named_shapes", "head_names", "DEFAULT_HEADS",
]
