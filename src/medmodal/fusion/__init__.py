"""Label fusion: combine K candidate label maps (raters, registered atlases) into one.

* :func:`staple` — binary STAPLE (Warfield et al., IEEE TMI 2004), ITK's algorithm in float64;
* :func:`multilabel_staple` — multi-label STAPLE (Rohlfing et al., IEEE TMI 2004), ITK's algorithm in float64;
* :func:`majority_vote`, :func:`weighted_vote`, :func:`dp_consensus` — votes, the last one DeepSTAPLE's
  data-parameter consensus (Weihsbach et al., WBIR 2022); :func:`vote_mode` — the plurality label and its ties.

The vote and multi-label STAPLE work in memory proportional to the volume (not to labels × volume) and take a
``progress(done, total)`` callback for long inputs.

Every function takes a ``(K, *spatial)`` stack (torch or numpy) and works for 2D and 3D alike.
"""

from __future__ import annotations

from medmodal.fusion.multilabel import MultiLabelStapleResult, multilabel_staple
from medmodal.fusion.staple import StapleResult, staple
from medmodal.fusion.vote import dp_consensus, majority_vote, vote_mode, weighted_vote

__all__ = [
    "MultiLabelStapleResult",
    "StapleResult",
    "dp_consensus",
    "majority_vote",
    "multilabel_staple",
    "staple",
    "vote_mode",
    "weighted_vote",
]
