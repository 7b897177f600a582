"""Plans, kinds, errors, files, progress: what every layer above may use."""
