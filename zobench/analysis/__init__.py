"""Reading records: derived views (ratios on read), budget checks, and the memory estimator's calibration."""
