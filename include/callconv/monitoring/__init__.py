"""What runs report: the run summary, the page's queries, day-over-day checks and alerts."""
