"""Data zobench carries (the SST-2 sample, a C4 calibration sample) and the calibration-corpus loader."""
