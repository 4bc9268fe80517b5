# Row 1 of the paper's comparison: DINO with dense FFNs on UODB (the baseline).
_base_ = '../_base_/dino-4scale_r50_8xb2-12e_uodb.py'
# The paper's rows (and the official DAMEX code) train the classification loss over all
# 167 unified classes: every other dataset's classes are negatives for an image.
# damex's default, loss_scope='dataset', counts only the image's own dataset's classes.
model = dict(bbox_head=dict(loss_scope='all'))
