"""rldiag.record"""
