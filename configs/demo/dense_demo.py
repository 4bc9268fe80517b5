# The demo with dense FFNs (DINO baseline): damex_demo.py but for the FFNs.
_base_ = './damex_demo.py'
model = dict(moe=None)
