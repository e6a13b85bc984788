"""Metrics: featurizers and rulers (features.py), feature statistics, the Frechet distance, its
intervals, FID-infinity and KID (fid.py), and paired comparisons with family-wise error control
(compare.py).
"""
