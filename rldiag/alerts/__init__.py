"""rldiag.alerts"""
