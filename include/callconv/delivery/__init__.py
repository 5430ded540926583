"""Stage 5: deliver conversions by the Google Ads API, the Data Manager API or an import file."""
