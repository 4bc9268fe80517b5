# Row 2: vanilla MoE (V-MoE noisy top-1 with importance + load balance losses) in
# decoder layers 0, 2, 4; no dataset information.
_base_ = '../_base_/dino-4scale_r50_8xb2-12e_uodb.py'
# The paper's rows (and the official DAMEX code) train the classification loss over all
# 167 unified classes: every other dataset's classes are negatives for an image.
# damex's default, loss_scope='dataset', counts only the image's own dataset's classes.
model = dict(
    bbox_head=dict(loss_scope='all'),
    moe=dict(
        num_experts=8,
        router=dict(type='SoftmaxTokenChoiceRouter', top_k=1, noise_std=1.0),
        decoder_layers=[0, 2, 4]))
