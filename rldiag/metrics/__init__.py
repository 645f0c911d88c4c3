"""rldiag.metrics"""
