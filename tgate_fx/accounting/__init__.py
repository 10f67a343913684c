"""Accounting: MACs of graphs and plans, inspection of variants, the report. Reads graphs; runs nothing."""
