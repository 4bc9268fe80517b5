# Router sweep: SinkhornTokenChoiceRouter in decoder layers 0, 2, 4 (8 experts), all else as the vanilla MoE row.
# Sinkhorn token choice: 20 Sinkhorn iterations, eps 1, columns first (as OTT).
# Differences from the reference's vision runs (google-research/vmoe), on purpose:
# routing groups are images (MoEFFN group_size='image', the default) so that a box never
# depends on its batch-mates; capacities are not rounded to multiples of 4
# (capacity_multiple_of=1) because DINO's decoder token count changes with the denoising
# queries; no capacity limit for token choice (the official DAMEX code's 1.25 dropped up
# to ~84% of an image's tokens).
_base_ = '../damex/moe-dino-e8_r50_4scale_8xb2-12e_uodb.py'
model = dict(moe=dict(router=dict(_delete_=True, type='SinkhornTokenChoiceRouter')))
