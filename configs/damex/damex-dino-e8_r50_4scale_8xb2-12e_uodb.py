# Row 3: DAMEX. The router is trained to send every dataset's tokens to its expert
# (the expert map of the mixture, see the base); inference needs no dataset id.
_base_ = '../_base_/dino-4scale_r50_8xb2-12e_uodb.py'
model = dict(moe=dict(
    num_experts=8,
    router=dict(type='DatasetAwareRouter', noise_std=1.0),
    decoder_layers=[0, 2, 4],
    aux_loss_weights=dict(damex=0.1)))
