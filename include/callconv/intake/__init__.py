"""Stages 1 to 3: pull the CRM extracts, validate them (Great Expectations), normalise and store the sales."""
