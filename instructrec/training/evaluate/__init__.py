"""Offline evaluation with the paper's protocol: candidate files, scenarios, methods, report."""
