"""rldiag.record.integrations"""
