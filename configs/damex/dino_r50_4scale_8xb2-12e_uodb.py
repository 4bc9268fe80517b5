# Row 1 of the paper's comparison: DINO with dense FFNs on UODB (the baseline).
_base_ = '../_base_/dino-4scale_r50_8xb2-12e_uodb.py'
