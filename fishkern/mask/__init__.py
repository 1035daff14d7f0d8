"""The FISH mask object and its builders."""
from .builders import bitfit_mask, from_boolean, from_scores, match_names, random_mask
from .fishmask import FishMask, named_shapes

__all__ = ["FishMask", "from_scores", "random_mask", "bitfit_mask", "from_boolean", "match_names", "named_shapes"]
