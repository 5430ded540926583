"""Offline call-conversion import for Google Ads: the pipeline logic, free of Airflow."""
