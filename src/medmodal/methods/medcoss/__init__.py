"""MedCoSS: continual self-supervised pre-training across modalities with a k-means rehearsal buffer (work in
progress; not a registered method yet).

Paper: Y. Ye, Y. Xie, J. Zhang, Z. Chen, Q. Wu, Y. Xia, *Continual Self-supervised Learning: Towards Universal
Multi-modal Medical Data Representation Learning*, CVPR 2024 (arXiv 2311.17597); spec ``shared/methods/medcoss.md``.
Parts so far:

* :mod:`.buffer`: the rehearsal buffer chosen by k-means on pooled encoder features (spec §2.5);
* ``transforms/mixup.py``: intra-modal mixup of buffer batches (spec §2.4).
"""
