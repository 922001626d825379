"""Local differential privacy, the privacy ledger and encrypted vector search (no Flower imports).

The mechanisms arrive with issues #7 (LDP and the ledger) and #10 (encrypted vector search).
"""
