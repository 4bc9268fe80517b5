# The demo with vanilla MoE FFNs (V-MoE noisy top-1 + balance losses): damex_demo.py but
# for the router.
_base_ = './damex_demo.py'
model = dict(moe=dict(router=dict(_delete_=True, type='SoftmaxTokenChoiceRouter', top_k=1,
                                  noise_std=1.0)))
