# The demo with vanilla MoE FFNs balanced without auxiliary losses (DeepSeek-V3): noisy
# top-1 softmax routing whose per-expert bias, added for the choice only, moves towards
# balance after every training step. moe_demo.py but for the balancing.
_base_ = './damex_demo.py'
model = dict(moe=dict(router=dict(_delete_=True, type='SoftmaxTokenChoiceRouter', top_k=1,
                                  noise_std=1.0, balance='aux_free', bias_update_rate=1e-3)))
