"""Predictions and pictures from sizes and measurements: the roofline planner, benchmark plots."""
