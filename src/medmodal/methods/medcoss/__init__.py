"""MedCoSS: continual self-supervised pretraining across modalities, one modality per stage, with a k-means rehearsal
buffer, intra-modal mixup and feature distillation against the previous stage's frozen encoder.

Paper: Y. Ye, Y. Xie, J. Zhang, Z. Chen, Q. Wu, Y. Xia, *Continual Self-supervised Learning: Towards Universal
Multi-modal Medical Data Representation Learning*, CVPR 2024 (arXiv 2311.17597); spec ``shared/methods/medcoss.md``.

* :mod:`.config`: the recipe's stages and switches; :mod:`.sources` reads a stage's reports or images;
  :mod:`.data`: items, buffers and the modality-homogeneous batch slots; :mod:`.system`: MAE / MLM / distillation;
  :mod:`.buffer`: the rehearsal buffer by k-means (spec §2.5); ``transforms/mixup.py``: intra-modal mixup;
* :mod:`.plugin`: one run trains one stage; :mod:`.stages`: ``medmodal pretrain`` (all stages, or a stage added to a
  model); :mod:`.evaluate`: linear probes per stage seen;
* ``networks/medcoss.py``: the shared encoder with its text, 2D and 3D tokenizers, the MAE decoder and the MLM head.
"""

from medmodal.engine.plugin import register_method
from medmodal.methods.medcoss.plugin import MedCoSSPlugin

register_method(MedCoSSPlugin())
