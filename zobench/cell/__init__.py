"""One cell: its pipeline (load -> mask -> quantize -> evaluate -> train, each a measured phase) and the
typed record it returns."""
