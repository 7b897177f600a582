"""Files in and out: official Mamba-Shedder configs, exported models, loading."""
