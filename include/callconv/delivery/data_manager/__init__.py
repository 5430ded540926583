"""Delivery of call conversions through Google's Data Manager API (``events:ingest``).

Kept apart from :mod:`callconv.delivery.upload` on purpose: the Google Ads API path's claim and
send code is tuned for memory and quota behaviour at scale, and this path reuses only
its public helpers by import.
"""
