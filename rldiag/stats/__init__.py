"""rldiag.stats"""
