"""rldiag.analysis"""
