# Row 2: vanilla MoE (V-MoE noisy top-1 with importance + load balance losses) in
# decoder layers 0, 2, 4; no dataset information.
_base_ = '../_base_/dino-4scale_r50_8xb2-12e_uodb.py'
model = dict(moe=dict(
    num_experts=8,
    router=dict(type='SoftmaxTokenChoiceRouter', top_k=1, noise_std=1.0),
    decoder_layers=[0, 2, 4]))
