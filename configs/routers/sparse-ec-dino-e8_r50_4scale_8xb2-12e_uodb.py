# Router sweep: SparsityConstrainedExpertChoiceRouter in decoder layers 0, 2, 4 (8 experts), all else as the vanilla MoE row.
_base_ = '../damex/moe-dino-e8_r50_4scale_8xb2-12e_uodb.py'
model = dict(moe=dict(router=dict(_delete_=True, type='SparsityConstrainedExpertChoiceRouter')))
